"""The multi-view head dataset on disk: format, builder, validation, loader and splits.

Format (``docs/ARCHITECTURE.md``), one folder:

* ``dataset.json``: ``{"format": "spinmeround-lite/heads-v1", "resolution": R, "views_per_identity": V,
  "identities": [...], "splits": {"train": [...], "heldout": [...]}, "camera_convention": "opencv", ...}``
* ``<identity>.npz`` per identity:

  ========  =======  ===============  ===========================================================
  key       dtype    shape            meaning
  ========  =======  ===============  ===========================================================
  rgb       uint8    (V, R, R, 3)     colour composited on white
  alpha     uint8    (V, R, R)        coverage, 255 = head
  normal    uint8    (V, R, R, 3)     round((n_cam + 1) / 2 * 255), composited on white by alpha
  c2w       float32  (V, 4, 4)        camera to world, OpenCV camera axes (``cameras.py``)
  K         float32  (3, 3)           intrinsics in pixels
  yaw       float32  (V,)             degrees, 0 = frontal
  pitch     float32  (V,)             degrees, positive = camera above
  params    float32  (D,)             identity parameters (``heads.HeadParams``); absent in external renders
  ========  =======  ===============  ===========================================================

Splits are by identity: a held-out identity never appears in training. ``build_dataset`` writes each ``.npz``
atomically and ``dataset.json`` last; ``ensure_dataset(run)`` builds the run's ``data/`` once and reuses it.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import cameras
from .heads import HeadParams, sample_identity
from .profiles import Profile, get_profile
from .render import normal_to_rgb, render_views
from .runs import atomic_path, write_json

FORMAT = "spinmeround-lite/heads-v1"
REQUIRED_KEYS = ("rgb", "alpha", "normal", "c2w", "K", "yaw", "pitch")


class DatasetError(ValueError):
    """A dataset folder is missing, incomplete or malformed; the message names the file and what to do."""


EXTRA_HELDOUT_OFFSET = 500_000   # identity indices of the evaluation-only heads (no training set reaches them)


def identity_name(index: int) -> str:
    return f"id{index:05d}"


def extra_heldout_indices(P: Profile) -> list[int]:
    """Identity indices of ``P.extra_heldout_identities``: ``EXTRA_HELDOUT_OFFSET + j``.

    They come from a range of head seeds no training set uses (training extras count up from ``identities``), so
    the held-out split can grow without touching any trained model: a reference trained before they existed has
    still never seen them.
    """
    return [EXTRA_HELDOUT_OFFSET + j for j in range(P.extra_heldout_identities)]


def heldout_names(P: Profile) -> list[str]:
    """The held-out split a dataset of profile ``P`` holds: the last ``heldout_identities`` of the first
    ``identities``, then the evaluation-only heads."""
    first = range(P.identities - P.heldout_identities, P.identities)
    return [identity_name(i) for i in list(first) + extra_heldout_indices(P)]


def identity_seed(seed: int, index: int) -> int:
    """The head seed of identity ``index`` in a dataset built with ``seed`` (distinct across datasets)."""
    return seed * 1_000_003 + index


# ----------------------------------------------------------------------------------------------
# building
# ----------------------------------------------------------------------------------------------
def render_identity(params: HeadParams, views: int, resolution: int, device=None,
                    chunk: int = 65536, jitter_seed: int | None = None) -> dict[str, np.ndarray]:
    """Render one identity at ``views`` cameras into the arrays of one ``.npz`` (see the module doc).

    The cameras are the fixed rig (``cameras.rig_angles``), or, with ``jitter_seed``, drawn for this identity
    around it (``cameras.jittered_rig_angles``; view 0 stays frontal)."""
    if jitter_seed is None:
        yaw, pitch = cameras.rig_angles(views)
    else:
        yaw, pitch = cameras.jittered_rig_angles(views, jitter_seed)
    c2w = cameras.orbit_c2w(yaw, pitch)
    K = cameras.intrinsics(resolution)
    out = render_views(params, c2w, K, resolution, resolution, device=device, chunk=chunk)
    to8 = lambda x: (x.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return {
        "rgb": to8(out["rgb"]),
        "alpha": to8(out["alpha"]),
        "normal": to8(normal_to_rgb(out["normal"], out["alpha"])),
        "c2w": c2w.numpy().astype(np.float32),
        "K": K.numpy().astype(np.float32),
        "yaw": yaw.numpy().astype(np.float32),
        "pitch": pitch.numpy().astype(np.float32),
        "params": params.to_vector().numpy(),
    }


def write_identity(path: str | Path, arrays: dict[str, np.ndarray]) -> Path:
    """Write one identity's arrays to ``path`` (``.npz``, compressed) atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
    return path


def build_dataset(root: str | Path, profile: Profile | str, seed: int = 0, device=None) -> Path:
    """Render ``profile.identities`` heads (+ ``profile.extra_train_identities``) at ``profile.views_per_identity``
    views into ``root``.

    The last ``profile.heldout_identities`` of the first ``profile.identities`` form the held-out split, so a
    dataset with extra training identities (the reference models') holds out exactly the heads the course's own
    dataset holds out; the extras are named after them (``id{identities + j}``) and join the train split.
    ``profile.extra_heldout_identities`` more heads, from a reserved seed range (``extra_heldout_indices``), join
    the held-out split (evaluation only). Each
    ``.npz`` is written atomically, ``dataset.json`` last, so a folder with ``dataset.json`` is whole; a rerun after
    an interruption keeps the identities already written.
    """
    P = get_profile(profile)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if P.heldout_identities >= P.identities:
        raise ValueError(f"profile {P.name}: heldout_identities ({P.heldout_identities}) must be fewer than "
                         f"identities ({P.identities})")
    indices = list(range(P.identities + P.extra_train_identities)) + extra_heldout_indices(P)
    names = [identity_name(i) for i in indices]
    total = len(indices)
    for name, i in tqdm(list(zip(names, indices)), desc=f"rendering {total} heads x {P.views_per_identity} views"):
        if (root / f"{name}.npz").exists():
            continue                                    # written whole (atomic) by an interrupted earlier build
        params = sample_identity(identity_seed(seed, i))
        arrays = render_identity(params, P.views_per_identity, P.resolution, device=device, chunk=P.render_chunk,
                                 jitter_seed=identity_seed(seed, i) if P.camera_jitter else None)
        write_identity(root / f"{name}.npz", arrays)
    heldout = heldout_names(P)
    held = set(heldout)
    train = [n for n in names if n not in held]
    write_json(root / "dataset.json", {
        "format": FORMAT,
        "resolution": P.resolution,
        "views_per_identity": P.views_per_identity,
        "identities": names,
        "splits": {"train": train, "heldout": heldout},
        "camera_convention": "opencv",
        "camera": {"radius": cameras.RADIUS, "fov_deg": cameras.FOV_DEG, "pitch_band_deg": cameras.PITCH_BAND_DEG,
                   "per_identity_cameras": bool(P.camera_jitter)},
        "params_names": HeadParams.names(),
        "source": "procedural",
        "profile": P.name,
        "seed": seed,
    })
    return root


def ensure_dataset(run) -> Path:
    """The run's dataset folder (``run.data_dir``), built with ``build_dataset`` unless already complete."""
    P = run.profile
    folder = run.ensure(run.data_dir, lambda d: build_dataset(d, P, seed=run.seed, device=run.device))
    meta = validate_dataset(folder, deep=False)
    if meta["resolution"] != P.resolution:
        raise DatasetError(f"{folder / 'dataset.json'}: resolution {meta['resolution']} but profile {P.name!r} "
                           f"wants {P.resolution}; use a run folder of this profile or delete {folder} to rebuild")
    return folder


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------
def _npz_headers(path: Path) -> dict[str, tuple[tuple, np.dtype]]:
    """Shape and dtype of each array in an ``.npz`` without decompressing the data."""
    out = {}
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with z.open(info) as f:
                version = np.lib.format.read_magic(f)
                reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                          else np.lib.format.read_array_header_2_0)
                shape, _, dtype = reader(f)
            out[info.filename[:-4]] = (tuple(shape), np.dtype(dtype))
    return out


def _expected(R: int, V: int) -> dict[str, tuple[tuple, str]]:
    return {"rgb": ((V, R, R, 3), "uint8"), "alpha": ((V, R, R), "uint8"), "normal": ((V, R, R, 3), "uint8"),
            "c2w": ((V, 4, 4), "float32"), "K": ((3, 3), "float32"), "yaw": ((V,), "float32"),
            "pitch": ((V,), "float32")}


def validate_identity_file(path: str | Path, resolution: int, views: int) -> None:
    """Check one ``.npz`` (keys, shapes, dtypes) from its headers; raise ``DatasetError`` naming what is wrong."""
    path = Path(path)
    fix = f"re-render it (delete {path.parent} and rerun ensure_dataset) or re-export it in the format of dataset.py"
    if not path.exists():
        raise DatasetError(f"{path} is missing: the dataset lists this identity; {fix}")
    try:
        heads = _npz_headers(path)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise DatasetError(f"{path} is not a readable .npz ({e}); {fix}") from None
    for key, (shape, dtype) in _expected(resolution, views).items():
        if key not in heads:
            raise DatasetError(f"{path} has no array {key!r} (it has {sorted(heads)}); {fix}")
        got_shape, got_dtype = heads[key]
        if got_shape != shape:
            raise DatasetError(f"{path}: {key!r} has shape {got_shape}, expected {shape} "
                               f"(resolution {resolution}, {views} views from dataset.json); {fix}")
        if got_dtype != np.dtype(dtype):
            raise DatasetError(f"{path}: {key!r} has dtype {got_dtype}, expected {dtype}; {fix}")
    if "params" in heads and len(heads["params"][0]) != 1:
        raise DatasetError(f"{path}: 'params' must be a vector (D,), got shape {heads['params'][0]}; {fix}")


def read_meta(root: str | Path) -> dict:
    """Read and check ``dataset.json`` of a dataset folder. Raises ``DatasetError`` saying what to do."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder: build it with ensure_dataset(run) (notebook 00) or point to "
                           "a folder of renders in the format of dataset.py")
    mp = root / "dataset.json"
    if not mp.exists():
        raise DatasetError(f"{mp} is missing: the folder is not a dataset or its build was interrupted; delete "
                           f"{root} and rerun ensure_dataset(run), or write dataset.json for external renders")
    try:
        meta = json.loads(mp.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{mp} is not valid JSON ({e}); delete {root} and rebuild it") from None
    if not isinstance(meta, dict):
        raise DatasetError(f"{mp} must hold a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise DatasetError(f"{mp}: 'format' is {meta.get('format')!r}, expected {FORMAT!r}")
    for key, typ in (("resolution", int), ("views_per_identity", int), ("identities", list), ("splits", dict)):
        if not isinstance(meta.get(key), typ):
            raise DatasetError(f"{mp}: key {key!r} is missing or not a {typ.__name__} (got {meta.get(key)!r})")
    if meta["resolution"] <= 0 or meta["views_per_identity"] <= 0:
        raise DatasetError(f"{mp}: resolution and views_per_identity must be positive")
    ids = meta["identities"]
    if not ids or not all(isinstance(i, str) and i and "/" not in i for i in ids) or len(set(ids)) != len(ids):
        raise DatasetError(f"{mp}: 'identities' must be a non-empty list of distinct file stems")
    splits = meta["splits"]
    for name in ("train", "heldout"):
        if not isinstance(splits.get(name), list):
            raise DatasetError(f"{mp}: splits.{name} is missing or not a list")
        unknown = set(splits[name]) - set(ids)
        if unknown:
            raise DatasetError(f"{mp}: splits.{name} names identities not in 'identities': {sorted(unknown)[:5]}")
    both = set(splits["train"]) & set(splits["heldout"])
    if both:
        raise DatasetError(f"{mp}: identities in both train and heldout splits: {sorted(both)[:5]}; "
                           "held-out identities must never be trained on")
    return meta


def validate_dataset(root: str | Path, deep: bool = True) -> dict:
    """Check a dataset folder: ``dataset.json`` and (``deep``) every listed ``.npz``'s keys, shapes and dtypes.

    Returns the metadata; raises ``DatasetError`` naming the missing or malformed file and what to do.
    """
    root = Path(root)
    meta = read_meta(root)
    if deep:
        for name in meta["identities"]:
            validate_identity_file(root / f"{name}.npz", meta["resolution"], meta["views_per_identity"])
    return meta


# ----------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------
class HeadDataset:
    """Multi-view renders of identities, one split of a dataset folder.

    ``views(i, idx)`` returns a dict of float tensors for identity ``i`` (index into ``ids``) and view indices
    ``idx`` (P,): ``rgb`` (P,3,H,W) in [0,1] on white, ``alpha`` (P,1,H,W), ``normal`` (P,3,H,W) unit camera-space
    normals (zero where alpha is 0), ``normal_rgb`` (P,3,H,W) as stored, ``c2w`` (P,4,4), ``K`` (P,3,3),
    ``yaw`` (P,), ``pitch`` (P,) in degrees. Decoded identities are cached in memory (``cache=False`` to skip).
    """

    def __init__(self, root: str | Path, split: str = "train", validate: bool = True, cache: bool = True):
        self.root = Path(root)
        self.meta = validate_dataset(self.root, deep=validate)
        if split == "all":
            self.ids = list(self.meta["identities"])
        elif split in ("train", "heldout"):
            self.ids = list(self.meta["splits"][split])
        else:
            raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
        self.split = split
        self.resolution = int(self.meta["resolution"])
        self.views_per_identity = int(self.meta["views_per_identity"])
        self._cache = {} if cache else None
        self._index = {name: i for i, name in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return (f"HeadDataset({str(self.root)!r}, split={self.split!r}: {len(self)} identities x "
                f"{self.views_per_identity} views at {self.resolution} px)")

    def identity_index(self, name: str) -> int:
        """Index in this split of the identity called ``name``."""
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(f"identity {name!r} is not in the {self.split!r} split of {self.root}") from None

    def arrays(self, i: int) -> dict[str, np.ndarray]:
        """The raw arrays of identity ``i`` as stored (see the module doc)."""
        name = self.ids[i]
        if self._cache is not None and name in self._cache:
            return self._cache[name]
        path = self.root / f"{name}.npz"
        try:
            with np.load(path) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
            raise DatasetError(f"{path} cannot be read ({e}); re-render or re-export it") from None
        missing = [k for k in REQUIRED_KEYS if k not in arrays]
        if missing:
            raise DatasetError(f"{path} lacks {missing}; re-render or re-export it")
        if self._cache is not None:
            self._cache[name] = arrays
        return arrays

    def params(self, i: int) -> torch.Tensor | None:
        """Identity parameters (D,) of a procedural head, or None for external renders."""
        a = self.arrays(i)
        return torch.from_numpy(a["params"]) if "params" in a else None

    def angles(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.arrays(i)
        return torch.from_numpy(a["yaw"]), torch.from_numpy(a["pitch"])

    def views(self, i: int, idx) -> dict[str, torch.Tensor]:
        """Views ``idx`` (P,) (ints, list or tensor) of identity ``i`` as float tensors (see the class doc)."""
        a = self.arrays(i)
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.views_per_identity):
            raise IndexError(f"view indices must lie in [0, {self.views_per_identity}), got {idx.tolist()}")
        n = idx.numpy()
        img = lambda x: torch.from_numpy(x[n]).permute(0, 3, 1, 2).float() / 255.0
        alpha = torch.from_numpy(a["alpha"][n]).float()[:, None] / 255.0
        normal_rgb = img(a["normal"])
        normal = torch.nn.functional.normalize(normal_rgb * 2 - 1, dim=1) * (alpha > 0)
        K = torch.from_numpy(a["K"])
        return {"rgb": img(a["rgb"]), "alpha": alpha, "normal": normal, "normal_rgb": normal_rgb,
                "c2w": torch.from_numpy(a["c2w"][n]), "K": K.expand(len(n), 3, 3).clone(),
                "yaw": torch.from_numpy(a["yaw"][n]), "pitch": torch.from_numpy(a["pitch"][n])}

    def sample_views(self, i: int, P: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """``P`` distinct random views of identity ``i`` (the M + K views of one training sample)."""
        if P > self.views_per_identity:
            raise ValueError(f"cannot sample {P} distinct views from {self.views_per_identity}")
        idx = torch.randperm(self.views_per_identity, generator=generator)[:P]
        out = self.views(i, idx)
        out["index"] = idx
        return out

    def nearest_view(self, i: int, yaw: float, pitch: float = 0.0) -> int:
        """Index of the stored view of identity ``i`` closest in angle to ``yaw``/``pitch`` (degrees)."""
        yaws, pitches = self.angles(i)
        dyaw = (yaws - yaw + 180.0) % 360.0 - 180.0
        return int(torch.argmin(dyaw ** 2 + (pitches - pitch) ** 2))


def write_external(root: str | Path, identities: dict[str, dict[str, np.ndarray]], heldout: list[str] = (),
                   **extra) -> Path:
    """Write multi-view renders from elsewhere in this format: ``identities`` maps a name to arrays (module doc).

    Every identity needs the same resolution and view count; ``params`` is optional. ``heldout`` names the
    held-out split. Validates the result.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    names = list(identities)
    first = identities[names[0]]
    for name, arrays in identities.items():
        write_identity(root / f"{name}.npz", arrays)
    write_json(root / "dataset.json", {
        "format": FORMAT, "resolution": int(first["rgb"].shape[1]), "views_per_identity": int(first["rgb"].shape[0]),
        "identities": names, "splits": {"train": [n for n in names if n not in heldout], "heldout": list(heldout)},
        "camera_convention": "opencv", "source": "external", **extra})
    validate_dataset(root)
    return root


def mean_image_ssim(train: HeadDataset, heldout: HeadDataset, max_train: int | None = None) -> float:
    """How alike the identities are: SSIM of the mean training image at each view against each held-out render.

    For every rig view v: ``mean_v`` = mean over training identities of their view-v RGB; the score averages
    ``SSIM(mean_v, heldout_i view v)`` over views and held-out identities. 1 means every head looks the same.
    """
    from .metrics import ssim

    V = train.views_per_identity
    ids = range(len(train) if max_train is None else min(max_train, len(train)))
    mean = sum(train.views(i, range(V))["rgb"] for i in ids) / len(ids)        # (V,3,H,W)
    scores = [ssim(mean, heldout.views(j, range(V))["rgb"]).mean() for j in range(len(heldout))]
    return float(torch.stack(scores).mean())


__all__ = ["FORMAT", "DatasetError", "HeadDataset", "build_dataset", "ensure_dataset", "validate_dataset",
           "render_identity", "write_identity", "write_external", "read_meta", "mean_image_ssim"]
