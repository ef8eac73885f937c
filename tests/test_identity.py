import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spinmeround_lite import identity as I
from spinmeround_lite.checkpoints import CheckpointError


# ----------------------------------------------------------------------------------------------
# ArcFace loss and the learned encoder
# ----------------------------------------------------------------------------------------------
def test_arcface_loss_matches_the_formula_by_hand():
    torch.manual_seed(0)
    emb, W, y = torch.randn(4, 8), torch.randn(3, 8), torch.tensor([0, 2, 1, 2])
    s, m = 30.0, 0.5
    cos = F.normalize(emb, dim=-1) @ F.normalize(W, dim=-1).T
    expected = 0.0
    for b in range(4):
        th = math.acos(float(cos[b, y[b]]))
        num = math.exp(s * math.cos(th + m))
        den = num + sum(math.exp(s * float(cos[b, j])) for j in range(3) if j != y[b])
        expected += -math.log(num / den) / 4
    assert I.arcface_loss(emb, W, y, s, m).item() == pytest.approx(expected, rel=1e-4)
    # the margin makes the true class harder: the loss grows with m
    assert I.arcface_loss(emb, W, y, s, 0.0) < I.arcface_loss(emb, W, y, s, m)


def test_learned_encoder_embeds_unit_vectors_and_roundtrips(tmp_path):
    cfg = I.EncoderConfig(width=4, input_res=16)
    enc = I.LearnedEncoder(cfg).eval()
    x = torch.rand(5, 3, 40, 40)
    e = enc.embed(x)
    assert e.shape == (5, 512)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(5))
    I.save_encoder(enc, tmp_path)
    back = I.load_encoder(tmp_path, expected={"width": 4, "input_res": 16})
    torch.testing.assert_close(back.embed(x), e)
    with pytest.raises(CheckpointError, match="width"):
        I.load_encoder(tmp_path, expected={"width": 8})


def test_crop_jitter_keeps_white_background_and_range():
    x = torch.ones(3, 3, 32, 32)
    x[:, :, 12:20, 12:20] = 0.2
    y = I.crop_jitter(x, torch.Generator().manual_seed(0), color=0.0)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert (y[:, :, :3, :3] == 1).all()              # corners stay white (background fills from outside)
    assert not torch.equal(y[0], y[1])                # each image gets its own jitter


# ----------------------------------------------------------------------------------------------
# alignment
# ----------------------------------------------------------------------------------------------
def similarity(scale, angle_deg, tx, ty):
    a = math.radians(angle_deg)
    return torch.tensor([[scale * math.cos(a), -scale * math.sin(a), tx],
                         [scale * math.sin(a), scale * math.cos(a), ty]], dtype=torch.float64)


def apply(M, pts):
    return pts @ M[:, :2].T + M[:, 2]


def test_umeyama_maps_a_warped_template_back_to_the_template():
    S = similarity(1.7, 23.0, 40.0, -12.0)
    kps = apply(S, I.ARCFACE_TEMPLATE)
    M = I.umeyama(kps, I.ARCFACE_TEMPLATE)
    torch.testing.assert_close(apply(M, kps), I.ARCFACE_TEMPLATE, atol=1e-8, rtol=0)
    # M is S's inverse
    S3 = torch.cat([S, torch.tensor([[0, 0, 1.0]], dtype=torch.float64)])
    torch.testing.assert_close(M, torch.linalg.inv(S3)[:2], atol=1e-10, rtol=0)
    # noisy keypoints still give the least-squares similarity (no reflection, residual small)
    noisy = kps + torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.5
    M2 = I.umeyama(noisy, I.ARCFACE_TEMPLATE)
    assert torch.det(M2[:, :2]) > 0
    assert (apply(M2, noisy) - I.ARCFACE_TEMPLATE).norm(dim=-1).max() < 1.0


def smooth_face(size=112):
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    img = torch.stack([0.5 + 0.4 * torch.sin(xs / 9), 0.5 + 0.4 * torch.cos(ys / 7),
                       0.5 + 0.4 * torch.sin((xs + ys) / 13)])
    return img


def test_align_face_undoes_a_similarity_warp():
    crop = smooth_face()
    S = similarity(1.6, -15.0, 50.0, 30.0)                  # template frame -> photo frame
    photo = I.warp_affine(crop, S, size=260)                 # the face somewhere in a 260x260 photo
    kps = apply(S, I.ARCFACE_TEMPLATE)
    back = I.align_face(photo, kps)
    assert back.shape == (3, 112, 112)
    inner = (slice(None), slice(10, 102), slice(10, 102))
    assert (back[inner] - crop[inner]).abs().max() < 0.03


# ----------------------------------------------------------------------------------------------
# ONNX models the tests build themselves
# ----------------------------------------------------------------------------------------------
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


def tiny_recognition(path, batch="N"):
    """(N, 3, 112, 112) -> AveragePool 8 -> Flatten -> Gemm -> (N, 512)."""
    W = np.random.default_rng(0).standard_normal((512, 3 * 14 * 14)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal(512).astype(np.float32) * 0.1
    nodes = [helper.make_node("AveragePool", ["data"], ["p"], kernel_shape=[8, 8], strides=[8, 8]),
             helper.make_node("Flatten", ["p"], ["f"], axis=1),
             helper.make_node("Gemm", ["f", "W", "b"], ["fc1"], transB=1)]
    graph = helper.make_graph(nodes, "tiny_arcface",
                              [helper.make_tensor_value_info("data", TensorProto.FLOAT, [batch, 3, 112, 112])],
                              [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [batch, 512])],
                              initializer=[numpy_helper.from_array(W, "W"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return W, b


def reference_embedding(crops, W, b):
    x = (crops * 255 - 127.5) / 127.5
    p = F.avg_pool2d(x, 8).flatten(1)
    return F.normalize(p @ torch.from_numpy(W).T + torch.from_numpy(b), dim=-1)


def tiny_scrfd(path, size, face):
    """A detector whose outputs are constants: one face at anchor ``face = (stride, row, col, box, kps)``."""
    stride_f, row, col, box, kps = face
    outs, inits, nodes = [], [], [helper.make_node("ReduceMean", ["input.1"], ["m"], keepdims=0)]
    nodes.append(helper.make_node("Mul", ["m", "zero"], ["z"]))
    inits.append(numpy_helper.from_array(np.array(0.0, np.float32), "zero"))
    tensors = {}
    for s in (8, 16, 32):
        n = (size // s) ** 2 * 2
        sc = np.full((n, 1), 0.01, np.float32)
        bb = np.ones((n, 4), np.float32)
        kp = np.zeros((n, 10), np.float32)
        if s == stride_f:
            i = (row * (size // s) + col) * 2           # anchor 0 of that cell
            cx, cy = col * s, row * s
            sc[i] = 0.9
            bb[i] = np.array([cx - box[0], cy - box[1], box[2] - cx, box[3] - cy]) / s
            kp[i] = ((kps - np.array([cx, cy])) / s).reshape(-1)
        tensors[s] = (sc, bb, kp)
    for kind in range(3):
        for s in (8, 16, 32):
            name = f"out_{kind}_{s}"
            arr = tensors[s][kind]
            inits.append(numpy_helper.from_array(arr, f"c_{name}"))
            nodes.append(helper.make_node("Add", ["z", f"c_{name}"], [name]))
            outs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(arr.shape)))
    graph = helper.make_graph(nodes, "tiny_scrfd",
                              [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, size, size])],
                              outs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


@pytest.mark.parametrize("batch", ["N", 1])
def test_recognition_onnx_embeds_aligned_crops(tmp_path, batch):
    W, b = tiny_recognition(tmp_path / "arcface.onnx", batch=batch)   # dynamic batch, or fixed 1x3x112x112
    enc = I.InsightFaceEncoder(tmp_path / "arcface.onnx")
    crops = torch.rand(3, 3, 112, 112)
    e = enc.embed(crops)                                     # no detector, no keypoints: already aligned
    assert e.shape == (3, 512)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(e, reference_embedding(crops, W, b), atol=1e-4, rtol=0)
    # with keypoints, the photo is aligned first: template keypoints on a 112 crop change nothing
    e2 = enc.embed(crops, keypoints=I.ARCFACE_TEMPLATE.expand(3, 5, 2))
    torch.testing.assert_close(e2, e, atol=1e-4, rtol=0)


def test_detector_keypoints_align_a_photo(tmp_path):
    tiny_recognition(tmp_path / "arcface.onnx")
    # a face in a 160x160 photo; the detector runs at 64x64 (scale 0.4) and reports it in its own pixels
    S = similarity(1.1, 8.0, 30.0, 20.0)
    kps_photo = apply(S, I.ARCFACE_TEMPLATE).float()
    box_photo = np.array([14.0, 20.0, 150.0, 158.0])
    tiny_scrfd(tmp_path / "det.onnx", 64, (16, 2, 2, box_photo * 0.4, kps_photo.numpy() * 0.4))
    det = I.SCRFDDetector(tmp_path / "det.onnx")
    photo = I.warp_affine(smooth_face(), S, size=160)
    boxes, scores, kps = det.detect(photo)
    assert len(boxes) == 1 and scores[0] == pytest.approx(0.9)
    torch.testing.assert_close(kps[0], kps_photo, atol=1e-3, rtol=0)
    torch.testing.assert_close(boxes[0], torch.tensor(box_photo, dtype=torch.float32), atol=1e-3, rtol=0)
    enc = I.InsightFaceEncoder(tmp_path / "arcface.onnx", tmp_path / "det.onnx")
    e_det = enc.embed(photo[None])
    e_kps = enc.embed(photo[None], keypoints=kps_photo[None])
    torch.testing.assert_close(e_det, e_kps, atol=1e-5, rtol=0)
    e_crop = enc.embed(smooth_face()[None], keypoints=I.ARCFACE_TEMPLATE[None])  # the crop the photo came from
    assert float((e_det * e_crop).sum()) > 0.99


def test_missing_model_files_name_where_they_go(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        I.InsightFaceEncoder.from_folder(tmp_path)
    msg = str(err.value)
    assert "arc2face/arcface.onnx" in msg and "antelopev2/scrfd_10g_bnkps.onnx" in msg
    (tmp_path / "insightface" / "antelopev2").mkdir(parents=True)
    tiny_recognition(tmp_path / "insightface" / "antelopev2" / "glintr100.onnx")
    enc = I.InsightFaceEncoder.from_folder(tmp_path)
    assert enc.detector is None and enc.files["recognition"].endswith("glintr100.onnx")


# ----------------------------------------------------------------------------------------------
# held-out verification of a tiny trained encoder (real renders, about 10 s)
# ----------------------------------------------------------------------------------------------
@pytest.mark.floats
def test_learned_encoder_verifies_heldout_identities():
    """200 steps on 8 identities; verification on 4 others (20 renders).

    Measured with this code over 6 draws (identities 500-511 with seed 0, as here, and 5 other sets of 12
    identities with seeds 1-5), native kernels and ATEN_CPU_CAPABILITY=default alike: the same-minus-different
    cosine gap is 0.67 +- 0.17 (min 0.44) trained, 0.10 +- 0.06 (max 0.19) untrained, the gap minus the untrained
    gap at least 0.31; the verification AUC is 0.935 .. 1.00 trained but also 0.84 .. 0.98 untrained (random
    convolutions already tell rendered heads apart), so the AUC is a sanity check and the gap is the test; last-5
    over first-5 loss 0.005 .. 0.046. (At the former 40 steps the gap fell to 0.31 and the AUC to 0.84 on a draw.)
    """
    from spinmeround_lite import heads, render

    yaw, pitch = torch.tensor([-24.0, -12.0, 0.0, 12.0, 24.0]), torch.tensor([-10.0, 5.0, 0.0, -5.0, 10.0])
    images, labels = [], []
    for k in range(12):                                        # 8 training and 4 held-out identities
        out = render.render_orbit(heads.sample_identity(500 + k), yaw, pitch, resolution=24, ao=False)
        images.append(out["rgb"].permute(0, 3, 1, 2))
        labels.append(torch.full((5,), k))
    x, y = torch.cat(images), torch.cat(labels)
    train = y < 8
    cfg = I.EncoderConfig(width=8, input_res=16, steps=200, batch=32, seed=0)
    enc, log = I.train_encoder(x[train], y[train], cfg, progress=False)
    untrained, _ = I.train_encoder(x[train], y[train], I.EncoderConfig(width=8, input_res=16, steps=0, seed=0),
                                   progress=False)
    assert sum(log["loss"][-5:]) < 0.25 * sum(log["loss"][:5])
    v = I.verification(enc.embed(x[~train]), y[~train])
    v0 = I.verification(untrained.embed(x[~train]), y[~train])
    assert v["verification_auc"] > 0.9                         # chance is 0.5; a sanity check (see above)
    # training pulls identities apart: the same/different gap on unseen identities widens clearly
    gap, gap0 = v["same_id_cos"] - v["diff_id_cos"], v0["same_id_cos"] - v0["diff_id_cos"]
    assert gap > 0.3 and gap > gap0 + 0.2, (v, v0)
    assert gap0 < 0.3                                          # the untrained stand-in fails the same bound


def test_ensure_encoder_trains_once_then_reuses(tmp_path):
    from spinmeround_lite import cameras
    from spinmeround_lite.dataset import write_external
    from spinmeround_lite.profiles import get_profile
    from spinmeround_lite.runs import Run

    prof = get_profile("test").replace(resolution=16, id_input_res=16, id_train_steps=3, id_batch=8)
    run = Run(prof, tmp_path / "run", device="cpu")
    yaw, pitch = cameras.rig_angles(8)
    rng = np.random.default_rng(0)
    ids = {}
    for k in range(4):                                         # flat-coloured "heads" are enough to train on
        rgb = np.broadcast_to(rng.integers(0, 255, 3, dtype=np.uint8), (8, 16, 16, 3)).copy()
        ids[f"p{k}"] = {"rgb": rgb, "alpha": np.full((8, 16, 16), 255, np.uint8), "normal": rgb,
                        "c2w": cameras.orbit_c2w(yaw, pitch).numpy(), "K": cameras.intrinsics(16).numpy(),
                        "yaw": yaw.numpy(), "pitch": pitch.numpy()}
    write_external(run.data_dir, ids, heldout=["p3"])
    run.mark_complete(run.data_dir)
    enc = I.ensure_encoder(run, "cond", progress=False)
    folder = run.model_dir("id_cond")
    assert {"model.safetensors", "config.json", "train_log.json", "COMPLETE"} <= {p.name for p in folder.iterdir()}
    assert len(I.training_log(run, "cond")["loss"]) == 3 and enc.config.classes == 3
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    again = I.ensure_encoder(run, "cond", progress=False)
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(again.embed(x), enc.embed(x))
    ev = I.ensure_encoder(run, "eval", progress=False)
    assert (ev.config.width, ev.config.seed) == (prof.id_eval_width, 2) != (enc.config.width, enc.config.seed)
    other = Run(prof.replace(id_width=4), run.root, device="cpu")
    with pytest.raises(CheckpointError, match="width"):
        I.ensure_encoder(other, "cond", progress=False)
