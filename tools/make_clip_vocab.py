"""Build the small CLIP vocabulary the course ships (``spinmeround_lite/assets/clip_vocab.json`` and
``clip_merges.txt``), so the tokenizer of notebook 01 works offline.

The layout is CLIP's: ids 0..255 are the 256 byte symbols, 256..511 the same symbols ending a word (``</w>``),
then one id per merge in merge order, then ``<|startoftext|>`` and ``<|endoftext|>``. The merges are learned
here by byte-pair encoding on a fixed list of words (each word counted once; ties broken alphabetically) until
every word is a single token, so the prompt ``photo of a id person`` becomes exactly five word tokens, as with
the real CLIP vocabulary. Any other text still tokenises (down to single bytes). Deterministic: rerunning it
rewrites identical files.

    python tools/make_clip_vocab.py [--out spinmeround_lite/assets]
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

WORDS = """
photo of a id person an the and with in on at to from by for this that is
face head portrait picture image view close up side back front left right top profile
man woman boy girl child young old adult people
hair eyes eye nose mouth lips ears ear skin beard glasses smile smiling neutral expression
white background studio light lighting color colour high quality detailed
render rendered procedural turntable orbit camera degree yaw pitch
one two three four five six seven eight
""".split()

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """The byte-level alphabet: printable Latin-1 bytes stand for themselves, the rest map to 256 + n."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out = {b: chr(b) for b in keep}              # CLIP's order: the printable bytes first, then the others
    for n, b in enumerate(b for b in range(256) if b not in out):
        out[b] = chr(256 + n)
    return out


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Byte-pair merges until every word of ``words`` is one symbol (most frequent pair first)."""
    b2u = bytes_to_unicode()
    seqs = []
    for w in dict.fromkeys(words):
        sym = [b2u[b] for b in w.encode("utf-8")]
        sym[-1] += "</w>"
        seqs.append(sym)
    merges = []
    while any(len(s) > 1 for s in seqs):
        pairs = Counter((s[i], s[i + 1]) for s in seqs for i in range(len(s) - 1))
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for s in seqs:
            i = 0
            while i < len(s) - 1:
                if (s[i], s[i + 1]) == best:
                    s[i:i + 2] = [s[i] + s[i + 1]]
                i += 1
    return merges


def build(words: list[str] = WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [a + "</w>" for a in alphabet]
    merges = learn_merges(words)
    tokens += [a + b for a, b in merges]
    tokens += [BOS, EOS]
    if len(set(tokens)) != len(tokens):
        raise RuntimeError("duplicate tokens in the vocabulary")
    return {t: i for i, t in enumerate(tokens)}, merges


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "spinmeround_lite" / "assets"),
                    help="folder for clip_vocab.json and clip_merges.txt")
    args = ap.parse_args(argv)
    vocab, merges = build()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "clip_vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    (out / "clip_merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                         encoding="utf-8")
    print(f"{out}: {len(vocab)} tokens, {len(merges)} merges, {len(WORDS)} words")


if __name__ == "__main__":
    main()
