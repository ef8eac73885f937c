"""Arc2Face-style identity tokens: the identity vector enters the model as one word of a prompt.

METHOD.md section 1. The prompt ``"photo of a id person"`` is tokenised by a CLIP tokenizer to 77 tokens::

    <|startoftext|> photo of a id person <|endoftext|> <|endoftext|> ... (padded to 77 with <|endoftext|>)

The token embedding at the ``id`` position is replaced by the identity embedding ``e`` (512, unit norm), the
sequence gets its position embeddings and runs through the CLIP text encoder (causal transformer + final
LayerNorm) as usual; its last hidden state ``(77, D)`` is the UNet's cross-attention context. The empty
prompt ``""`` through the same encoder is the unconditional context of classifier-free guidance.

How ``e`` (512) becomes a token embedding of width ``D`` (``inject``):

* ``D >= 512`` (768 for CLIP ViT-L / Arc2Face): ``[e, 0, ..., 0]``, zero-padded, exactly as Arc2Face.
* ``D < 512`` (the small course profiles): ``P e`` with ``P`` a fixed ``(D, 512)`` matrix, the first ``D`` rows
  of a random orthogonal matrix (seed 0, stored as a buffer, never trained) times ``sqrt(512 / D)``: it keeps
  inner products on average (``E ||P e||^2 = ||e||^2`` for directions spread over the sphere), so the injected
  token has the same scale as Arc2Face's. It is a plain linear map, so the test can check it exactly.

Where the files come from: the default tokenizer is built offline from the small vocabulary the package ships
(``assets/clip_vocab.json``, ``assets/clip_merges.txt``, made by ``tools/make_clip_vocab.py``) and the text
encoder is a small ``CLIPTextModel`` sized by the profile (``text_hidden``, ``text_layers``, ``text_heads``).
A local folder with a real CLIP tokenizer and Arc2Face's fine-tuned encoder loads instead
(``IdentityContext("weights/arc2face")``, see ``load_pretrained_parts``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import nn

from .profiles import PROFILES, Profile, get_profile

PROMPT = "photo of a id person"
ID_TOKEN = "id</w>"            # the word whose embedding is replaced
MAX_LENGTH = 77
ID_DIM = 512
ASSETS = Path(__file__).resolve().parent / "assets"


# ----------------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------------
def course_tokenizer():
    """The CLIP tokenizer built offline from the vocabulary the package ships (740 tokens)."""
    from transformers import CLIPTokenizer

    vpath, mpath = ASSETS / "clip_vocab.json", ASSETS / "clip_merges.txt"
    for p in (vpath, mpath):
        if not p.exists():
            raise FileNotFoundError(f"{p} is missing from the package: run `python tools/make_clip_vocab.py` "
                                    "in the course checkout to write it")
    vocab = json.loads(vpath.read_text(encoding="utf-8"))
    merges = [tuple(line.split(" ")) for line in mpath.read_text(encoding="utf-8").splitlines()
              if line and not line.startswith("#version")]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LENGTH)


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Prompts -> input ids (B, 77), padded with ``<|endoftext|>`` and truncated as CLIP does."""
    return tokenizer(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                     return_tensors="pt").input_ids


def _find_subfolder(root: Path, names: tuple[str, ...], marker: str) -> Path | None:
    for name in names:
        d = root / name if name else root
        if (d / marker).exists():
            return d
    return None


def load_pretrained_parts(folder: str | os.PathLike):
    """A CLIP tokenizer and ``CLIPTextModel`` from a local folder (no downloads).

    Looked for: the tokenizer in ``tokenizer/`` or the folder itself (``vocab.json`` + ``merges.txt``, or
    ``tokenizer.json``), the text
    encoder in ``encoder/`` (Arc2Face's layout), ``text_encoder/`` (diffusers' layout) or the folder itself
    (``config.json`` + weights).
    """
    from transformers import CLIPTextModel, CLIPTokenizer

    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder. Put Arc2Face's text encoder in {root}/encoder/ "
                                f"(config.json, model.safetensors) and a CLIP tokenizer in {root}/tokenizer/ "
                                "(vocab.json, merges.txt), or use the small default context (a profile).")
    tdir = (_find_subfolder(root, ("tokenizer", ""), "vocab.json")
            or _find_subfolder(root, ("tokenizer", ""), "tokenizer.json"))
    edir = _find_subfolder(root, ("encoder", "text_encoder", ""), "config.json")
    missing = []
    if tdir is None:
        missing.append(f"{root}/tokenizer/vocab.json and merges.txt, or tokenizer.json (a CLIP ViT-L tokenizer)")
    if edir is None:
        missing.append(f"{root}/encoder/config.json and model.safetensors (Arc2Face's CLIP text encoder)")
    if missing:
        raise FileNotFoundError("cannot load a pretrained identity context; missing:\n  " + "\n  ".join(missing))
    tokenizer = CLIPTokenizer.from_pretrained(str(tdir), local_files_only=True)
    text_model = CLIPTextModel.from_pretrained(str(edir), local_files_only=True)
    return tokenizer, text_model


def small_text_model(profile: Profile, vocab_size: int, bos_id: int, eos_id: int):
    """A randomly initialised ``CLIPTextModel`` of the profile's size (77 positions)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=profile.text_hidden,
                            intermediate_size=4 * profile.text_hidden, num_hidden_layers=profile.text_layers,
                            num_attention_heads=profile.text_heads, max_position_embeddings=MAX_LENGTH,
                            hidden_act="quick_gelu", bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    return CLIPTextModel(config)


def fixed_projection(dim_out: int, dim_in: int = ID_DIM, seed: int = 0) -> torch.Tensor:
    """``P`` (dim_out, dim_in): orthonormal rows times ``sqrt(dim_in / dim_out)`` (dim_out < dim_in)."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(dim_in, dim_in, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))[None]          # a unique orthogonal matrix for the seed
    return (q[:dim_out] * math.sqrt(dim_in / dim_out)).float()


# ----------------------------------------------------------------------------------------------
# the context encoder
# ----------------------------------------------------------------------------------------------
class IdentityContext(nn.Module):
    """Identity embedding -> cross-attention context through a CLIP text encoder.

    ``IdentityContext(profile)`` builds the small encoder of the profile; ``IdentityContext(folder)`` loads a
    tokenizer and Arc2Face's text encoder from a local folder.

    ``forward(id_emb (B, 512) or None) -> (B, 77, D)``; ``None`` gives the empty-prompt context (B = 1, or
    ``batch_size``).
    """

    def __init__(self, source: Profile | str | os.PathLike, prompt: str = PROMPT):
        super().__init__()
        if not isinstance(source, Profile) and source in PROFILES:
            source = get_profile(source)                                   # a profile's name
        if isinstance(source, Profile):
            self.tokenizer = course_tokenizer()
            self.text_model = small_text_model(source, len(self.tokenizer), self.tokenizer.bos_token_id,
                                               self.tokenizer.eos_token_id)
            self.source = f"profile:{source.name}"
        else:
            self.tokenizer, self.text_model = load_pretrained_parts(source)
            self.source = str(source)
        self.prompt = prompt
        self.hidden = self.text_model.config.hidden_size
        self.register_buffer("prompt_ids", tokenize(self.tokenizer, [prompt])[0], persistent=False)
        self.register_buffer("empty_ids", tokenize(self.tokenizer, [""])[0], persistent=False)
        id_token = self.tokenizer.convert_tokens_to_ids(ID_TOKEN)
        where = (self.prompt_ids == id_token).nonzero().flatten()
        if len(where) != 1:
            raise ValueError(f"the prompt {prompt!r} must contain the word 'id' exactly once as a token "
                             f"({ID_TOKEN!r}); its tokens are {self.tokenizer.convert_ids_to_tokens(self.prompt_ids)}")
        self.id_position = int(where[0])
        if self.hidden < ID_DIM:
            self.register_buffer("id_proj", fixed_projection(self.hidden))
        else:
            self.id_proj = None

    # the pieces, each testable ---------------------------------------------------------------------
    def token_table(self, ids: torch.Tensor | None = None) -> list[tuple[int, int, str]]:
        """(position, id, token) of the prompt up to and including the first ``<|endoftext|>``."""
        ids = self.prompt_ids if ids is None else ids
        toks = self.tokenizer.convert_ids_to_tokens(ids.tolist())
        n = toks.index(self.tokenizer.eos_token) + 1 if self.tokenizer.eos_token in toks else len(toks)
        return [(i, int(ids[i]), toks[i]) for i in range(n)]

    def inject(self, id_emb: torch.Tensor) -> torch.Tensor:
        """The token embedding that replaces ``id``: (B, 512) -> (B, D), zero-padded or ``P e`` (module doc)."""
        if id_emb.shape[-1] != ID_DIM:
            raise ValueError(f"identity embeddings must be (B, {ID_DIM}), got {tuple(id_emb.shape)}")
        if self.id_proj is not None:
            return id_emb @ self.id_proj.T.to(id_emb)
        return torch.nn.functional.pad(id_emb, (0, self.hidden - ID_DIM))

    def input_embeds(self, id_emb: torch.Tensor | None, batch_size: int = 1) -> torch.Tensor:
        """Token embeddings (B, 77, D) before positions: the prompt's with ``id`` replaced, or the empty prompt's."""
        table = self.text_model.embeddings.token_embedding
        if id_emb is None:
            return table(self.empty_ids)[None].expand(batch_size, -1, -1)
        e = table(self.prompt_ids)[None].repeat(id_emb.shape[0], 1, 1)
        e[:, self.id_position] = self.inject(id_emb.to(e.dtype))
        return e

    def encode_embeds(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """Run token embeddings (B, 77, D) through CLIP's text transformer -> last hidden state (B, 77, D).

        The same steps as ``CLIPTextModel.forward`` (positions, causal self-attention, final LayerNorm), which
        takes only token ids.
        """
        from transformers.masking_utils import create_causal_mask

        tm = self.text_model
        hidden = tm.embeddings(inputs_embeds=inputs_embeds)
        mask = create_causal_mask(config=tm.config, inputs_embeds=hidden, attention_mask=None, cache=None)
        out = tm.encoder(inputs_embeds=hidden, attention_mask=mask, is_causal=True)
        return tm.final_layer_norm(out.last_hidden_state)

    def forward(self, id_emb: torch.Tensor | None, batch_size: int = 1) -> torch.Tensor:
        """id_emb (B, 512) or None -> context (B, 77, D)."""
        return self.encode_embeds(self.input_embeds(id_emb, batch_size))
