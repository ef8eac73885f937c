"""The input of a spin: any image read as RGB on white, and a photo framed like the renders (notebook 10).

Inputs: a path, a PIL image, or an array/tensor; any size and mode (RGBA composited on white, grayscale to RGB,
16-bit scaled). Framing: the model knows heads framed as the rig renders them (``cameras``): a square image
whose left and right edges are plain white is taken as such a render and used as it is. Any other image is
aligned like a photo (``faces``, notebook 10): a face detector finds the largest face and its 5 keypoints (eye
centres, nose tip, mouth corners), a similarity transform puts them where the procedural heads' eyes, nose tip
and mouth corners appear in a frontal render (the PanoHead/FFHQ idea of a keypoint-defined crop, with this
course's framing), and GrabCut replaces the background by white. The face backend (``face_backend``,
``--face-backend``): ``auto`` uses insightface's SCRFD detector where its file is present and otherwise the
shipped dlib detector and 68 landmarks; the choice is printed by the CLI and recorded in ``info``. A photo
without a usable face stops with ``AlignmentError`` (``faces.FaceError``) naming it; ``align=False``
(``--no-align``) skips alignment for an image that is already a square, centred head (a non-square one is
padded with white).
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .faces import FaceError, choose_backend, frame_photo
from .runs import find_repo_root

MIN_SIDE = 16                        # smallest input image side accepted
DETECTOR = Path("insightface") / "antelopev2" / "scrfd_10g_bnkps.onnx"
ENV_WEIGHTS = "SMR_WEIGHTS"          # folder of external model files (default: <checkout>/weights)


class ImageError(ValueError):
    """An input image that cannot be read or used; the message names it and says what to do."""


AlignmentError = FaceError   # a photo could not be aligned (no face, a face too small, no face models)


def load_image(src, name: str | None = None) -> torch.Tensor:
    """Any image -> float RGB (3, H, W) in [0, 1], composited on white.

    ``src``: a file path, a PIL image, a numpy array (H, W), (H, W, 1..4) or a tensor (C, H, W) / (1, C, H, W).
    uint8 is scaled by 1/255, uint16 by 1/65535; floats must lie in [0, 1]. RGBA and LA are composited on white,
    grayscale is repeated to RGB, palette and other PIL modes are converted. Errors (``ImageError``,
    ``FileNotFoundError``) name the input.
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file. Give the path of an image file (PNG, JPEG, ...).")
        if path.is_dir():
            raise ImageError(f"{path} is a folder; give the path of one image file")
        try:
            with Image.open(path) as im:
                _shrink_on_load(im)
                im.load()
                im = as_displayed(im, str(path))
        except UnidentifiedImageError:
            kind = _container_kind(path)
            if kind:
                raise ImageError(f"{path} is a {kind} file, which PIL cannot read without a plugin: convert it to "
                                 "JPEG or PNG (phones: the camera's 'Most compatible' format), or "
                                 "`pip install pillow-heif`") from None
            raise ImageError(f"{path} is not an image file this package can read (PIL does not recognise it); "
                             "give a PNG or JPEG") from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise ImageError(f"{path} is corrupt or truncated ({e}); re-export or re-download it") from None
        return _from_pil(im, str(path))
    if isinstance(src, Image.Image):
        return _from_pil(as_displayed(src, name or "the PIL image"), name or "the PIL image")
    if isinstance(src, torch.Tensor):
        t = src.detach().cpu()
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim == 3 and t.shape[0] in (1, 2, 3, 4) and t.shape[-1] not in (1, 2, 3, 4):
            t = t.permute(1, 2, 0)                           # (C, H, W) -> (H, W, C)
        return _from_array(t.numpy(), name or "the tensor")
    if isinstance(src, np.ndarray):
        return _from_array(src, name or "the array")
    raise ImageError(f"cannot read an image from a {type(src).__name__}: pass a file path, a PIL image, "
                     "a numpy array (H, W[, C]) or a tensor (C, H, W)")
MAX_PHOTO_SIDE = 4096    # longer photos are shrunk to this side while decoding (a 48 MP photo holds ~0.6 GB as floats)


def _shrink_on_load(im) -> None:
    """Let a JPEG decode at a reduced scale (DCT scaling, exact to a power of two) when it is far above
    ``MAX_PHOTO_SIDE``; other formats are resized after orientation in ``as_displayed``."""
    if im.format == "JPEG" and max(im.size) > 2 * MAX_PHOTO_SIDE:
        scale = max(im.size) / MAX_PHOTO_SIDE
        im.draft(im.mode, (round(im.size[0] / scale), round(im.size[1] / scale)))


def _container_kind(path: Path) -> str:
    """'HEIC/HEIF' or 'AVIF' when the file is an ISO media container of that brand (what phones store), else ''."""
    try:
        head = path.read_bytes()[:16] if path.stat().st_size < 1 << 30 else b""
    except OSError:
        return ""
    if head[4:8] != b"ftyp":
        return ""
    brand = head[8:12]
    if brand in (b"heic", b"heix", b"hevc", b"hevx", b"mif1", b"msf1", b"heim", b"heis"):
        return "HEIC/HEIF"
    return "AVIF" if brand in (b"avif", b"avis") else ""


def as_displayed(im, name: str = "the image"):
    """A PIL image as every image viewer shows it: the recorded orientation applied, colours in sRGB, the first
    frame, at most ``MAX_PHOTO_SIDE`` pixels long.

    Cameras and phones store a photo in the sensor's orientation and record the turn in its EXIF ``Orientation``
    tag (values 2-8: rotations and mirrorings); a face stored sideways is not found by a detector, so the tag is
    applied first and then dropped. A photo with an embedded colour profile (Display P3 on phones, Adobe RGB on
    cameras) is converted to sRGB, the space the course's images and models live in. Multi-picture files (MPO from
    some cameras, animated GIFs) give their first frame.
    """
    from PIL import Image, ImageOps

    if getattr(im, "n_frames", 1) > 1:
        im.seek(0)
    try:
        out = ImageOps.exif_transpose(im)
    except (ValueError, OSError, SyntaxError, TypeError) as e:          # an unreadable EXIF block: keep the pixels
        warnings.warn(f"{name}: its EXIF data cannot be read ({e}); using the pixels as stored", stacklevel=2)
        out = im.copy()
    icc = out.info.get("icc_profile")
    if icc and out.mode in ("RGB", "RGBA", "CMYK"):
        out = _to_srgb(out, icc, name)
    if max(out.size) > MAX_PHOTO_SIDE:
        f = MAX_PHOTO_SIDE / max(out.size)
        out = out.resize((max(1, round(out.size[0] * f)), max(1, round(out.size[1] * f))), Image.Resampling.LANCZOS)
    return out


def _to_srgb(im, icc: bytes, name: str):
    """Convert ``im`` from its embedded ICC profile to sRGB (alpha kept); unchanged when the profile is sRGB
    already or cannot be read."""

    try:
        from PIL import ImageCms

        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        desc = (ImageCms.getProfileDescription(src) or "").strip()
        if "srgb" in desc.lower().replace(" ", ""):
            return im
        alpha = im.getchannel("A") if im.mode == "RGBA" else None
        base = im.convert("RGB") if im.mode == "RGBA" else im
        out = ImageCms.profileToProfile(base, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
    except Exception as e:   # noqa: BLE001 -- a broken profile must not stop a spin: say so, keep the pixels
        warnings.warn(f"{name}: its colour profile cannot be applied ({e}); reading its values as sRGB",
                      stacklevel=3)
        return im
    if alpha is not None:
        out.putalpha(alpha)
    out.info.pop("icc_profile", None)
    return out


def _from_pil(im, name: str) -> torch.Tensor:
    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(im, dtype=np.float64)
        if mode.startswith("I;16"):
            a = a / 65535.0                                   # 16-bit grayscale
        elif mode == "I":
            a = a / (65535.0 if a.max() > 255 else 255.0)     # 16-bit PNGs may open as 32-bit "I"
        elif a.max() > 1.0:
            a = a / (255.0 if a.max() <= 255 else 65535.0)
        return _from_array(a.astype(np.float32), name)
    if mode in ("P", "PA", "LA", "La", "RGBa"):
        im = im.convert("RGBA")
    elif mode not in ("RGB", "RGBA", "L"):
        try:
            im = im.convert("RGB")                            # 1, CMYK, YCbCr, LAB, HSV, RGBX, ...
        except (ValueError, OSError) as e:
            raise ImageError(f"{name} has PIL mode {mode!r}, which cannot be converted to RGB ({e})") from None
    return _from_array(np.asarray(im), name)


def _from_array(a: np.ndarray, name: str) -> torch.Tensor:
    a = np.asarray(a)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 2, 3, 4):
        raise ImageError(f"{name} has shape {a.shape}; an image is (H, W), (H, W, C) or (C, H, W) with 1-4 "
                         "channels (gray, gray+alpha, RGB, RGBA)")
    if a.dtype == np.bool_:
        x = a.astype(np.float32)
    elif a.dtype == np.uint8:
        x = a.astype(np.float32) / 255.0
    elif a.dtype == np.uint16:
        x = a.astype(np.float32) / 65535.0
    elif np.issubdtype(a.dtype, np.integer):
        hi = int(a.max()) if a.size else 0
        if a.min() < 0 or hi > 65535:
            raise ImageError(f"{name} holds integers outside 0..65535; give 8-bit or 16-bit pixel values")
        x = a.astype(np.float32) / (255.0 if hi <= 255 else 65535.0)
    elif np.issubdtype(a.dtype, np.floating):
        x = a.astype(np.float32)
        if not np.isfinite(x).all():
            raise ImageError(f"{name} contains NaN or infinite values")
        if x.size and (x.min() < -1e-3 or x.max() > 1 + 1e-3):
            raise ImageError(f"{name} is a float image with values in [{x.min():.3g}, {x.max():.3g}]; float "
                             "images must lie in [0, 1] (divide 8-bit values by 255)")
        x = x.clip(0, 1)
    else:
        raise ImageError(f"{name} has dtype {a.dtype}; give uint8, uint16 or float pixels")
    H, W, C = x.shape
    if min(H, W) < MIN_SIDE:
        raise ImageError(f"{name} is {W}x{H} pixels; the smallest accepted side is {MIN_SIDE}")
    if C in (2, 4):                                           # composite on white by alpha
        alpha = x[..., -1:]
        x = x[..., :-1] * alpha + (1.0 - alpha)
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1).contiguous()


def looks_like_render(img: torch.Tensor, white: float = 0.95, share: float = 0.95) -> bool:
    """Is ``img`` (3, H, W) framed like a rig render? Square, with plain white left and right edges.

    The renders' background is pure white and only the neck reaches the image border (at the bottom), so both
    side columns are white; photos almost never are.
    """
    H, W = img.shape[-2:]
    if H != W:
        return False
    w = img.min(0).values >= white                           # (H, W) white pixels
    return bool(w[:, 0].float().mean() >= share and w[:, -1].float().mean() >= share)


def resize_square(img: torch.Tensor, size: int) -> torch.Tensor:
    """Pad (3, H, W) to a centred square with white, then resize (antialiased) to (3, size, size)."""
    H, W = img.shape[-2:]
    if H != W:
        s = max(H, W)
        out = torch.ones(3, s, s, dtype=img.dtype)
        out[:, (s - H) // 2:(s - H) // 2 + H, (s - W) // 2:(s - W) // 2 + W] = img
        img = out
    if img.shape[-1] != size:
        img = F.interpolate(img[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    return img.clamp(0, 1)


def weights_root(weights_dir: str | os.PathLike | None = None) -> Path:
    """Folder of external model files: ``weights_dir``, else ``$SMR_WEIGHTS``, else ``<checkout>/weights``."""
    if weights_dir:
        return Path(weights_dir)
    if os.environ.get(ENV_WEIGHTS):
        return Path(os.environ[ENV_WEIGHTS])
    root = find_repo_root(Path(__file__).parent) or find_repo_root()
    return (root / "weights") if root else Path("weights")


def align_photo(img: torch.Tensor, resolution: int, weights_dir: str | os.PathLike | None = None,
                name: str = "the image", face_backend: str = "auto", details: dict | None = None) -> torch.Tensor:
    """Frame a photo like the renders (3, R, R): detect the face, its 5 keypoints, align them onto
    ``face_template(R)``, whiten the background (``faces.frame_photo``).

    ``face_backend``: ``auto`` (insightface when its detector file is present, else the shipped dlib), ``dlib`` or
    ``insightface``. ``details`` (a dict) receives the backend, why it was chosen, the faces found and the face box.
    Raises ``AlignmentError`` (``faces.FaceError``) naming the photo when it cannot be aligned.
    """
    det_path = weights_root(weights_dir) / DETECTOR
    backend, reason = choose_backend(face_backend, det_path)
    framed = frame_photo(img, resolution, backend=backend, name=name, detector_path=det_path)
    if details is not None:
        details.update(framed.info(), face_backend_reason=reason)
    return framed.image


def prepare_input(image_or_path, resolution: int, align: bool = True,
                  weights_dir: str | os.PathLike | None = None, face_backend: str = "auto",
                  details: dict | None = None) -> tuple[torch.Tensor, str]:
    """Read and frame the input: (3, R, R) in [0, 1] and how it was framed ("render", "as given", "aligned").

    ``details`` (a dict) receives what aligning a photo found (``align_photo``).
    """
    name = str(image_or_path) if isinstance(image_or_path, (str, os.PathLike)) else None
    img = load_image(image_or_path, name)
    if looks_like_render(img):
        return resize_square(img, resolution), "render"
    if not align:
        if img.shape[-1] != img.shape[-2]:
            warnings.warn(f"{name or 'the image'} is {img.shape[-1]}x{img.shape[-2]}, not square; padded with "
                          "white to a square", stacklevel=2)
        return resize_square(img, resolution), "as given"
    return align_photo(img, resolution, weights_dir, name or "the image", face_backend, details), "aligned"
