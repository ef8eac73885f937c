"""The latent space: the autoencoder saves and loads (a local SD-style folder too), the codec's scale gives unit
variance, the latent cache holds the right latents (white and coloured backgrounds) and is rebuilt when stale."""

import numpy as np
import pytest
import torch

from spinmeround_lite.dataset import HeadDataset, write_external
from spinmeround_lite.latents import (
    LatentCache,
    LatentCodec,
    background_colours,
    build_vae,
    composite,
    ensure_latent_cache,
    ensure_vae,
    load_vae,
    measure_scale,
)
from spinmeround_lite.profiles import get_profile
from spinmeround_lite.runs import Run

TINY = get_profile("test").replace(name="tiny", resolution=16, vae_channels=(8, 16), vae_steps=2, vae_batch=4)


def tiny_vae(seed=0, scale=0.7):
    torch.manual_seed(seed)
    vae = build_vae(TINY)
    vae.register_to_config(scaling_factor=scale)
    return vae.eval()


def images(n=6, res=16, seed=0):
    return torch.rand(n, 3, res, res, generator=torch.Generator().manual_seed(seed))


def test_save_pretrained_round_trip(tmp_path):
    vae = tiny_vae()
    vae.save_pretrained(tmp_path / "vae")
    loaded = load_vae(tmp_path)                                      # finds vae/ in a pipeline-like folder
    a, b = LatentCodec(vae), LatentCodec(loaded)
    assert b.scale == pytest.approx(0.7) and b.latent_res == 8
    x = images()
    torch.testing.assert_close(b.encode(x), a.encode(x))
    z = a.encode(x)
    torch.testing.assert_close(b.decode(z), a.decode(z))


def test_pretrained_folder_replaces_training(tmp_path):
    vae = tiny_vae(scale=0.18215)
    vae.save_pretrained(tmp_path / "sd-vae")
    run = Run(TINY.replace(vae_pretrained=str(tmp_path / "sd-vae")), tmp_path / "run", device="cpu")
    codec = ensure_vae(run, progress=False)                          # no dataset, no training: the local folder
    assert codec.scale == pytest.approx(0.18215)
    x = images()
    torch.testing.assert_close(codec.encode(x), LatentCodec(vae).encode(x))
    assert not run.model_dir("vae").exists()


def test_missing_pretrained_folder_is_a_clear_error(tmp_path):
    run = Run(TINY.replace(vae_pretrained=str(tmp_path / "weights" / "sd15-vae")), tmp_path / "run", device="cpu")
    with pytest.raises(FileNotFoundError, match="never downloads"):
        ensure_vae(run, progress=False)


def test_codec_shapes_and_range():
    codec = LatentCodec(tiny_vae())
    x = images(6).reshape(2, 3, 3, 16, 16)                          # (B, V, 3, H, W)
    z = codec.encode(x)
    assert z.shape == (2, 3, 4, 8, 8)
    y = codec.decode(z)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    with pytest.raises(ValueError, match="3, H, W"):
        codec.encode(torch.rand(2, 4, 16, 16))


def test_measured_scale_gives_unit_variance():
    vae = tiny_vae()
    x = images(16)
    scale, stats = measure_scale(vae, x)
    assert abs(scale - 1.0) > 0.05                                   # the raw latents are not unit variance
    z = LatentCodec(vae, scale=scale).encode(x)
    assert z.std().item() == pytest.approx(1.0, rel=1e-4)


def test_composite_puts_background_colour():
    rgb = torch.ones(2, 3, 4, 4)
    rgb[:, :, 1:3, 1:3] = 0.25                                       # a grey square on white
    alpha = torch.zeros(2, 1, 4, 4)
    alpha[:, :, 1:3, 1:3] = 1
    colour = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.4, 0.6]])
    out = composite(rgb, alpha, colour)
    torch.testing.assert_close(out[:, :, 1:3, 1:3], rgb[:, :, 1:3, 1:3])
    torch.testing.assert_close(out[1, :, 0, 0], colour[1])
    torch.testing.assert_close(background_colours("id7", 2, 3), background_colours("id7", 2, 3))
    assert not torch.equal(background_colours("id7", 2, 3), background_colours("id8", 2, 3))
    assert background_colours("id7", 2, 3).shape == (2, 3)


def _tiny_dataset(root, n=3, views=4, res=16):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:res, :res]
    ids = {}
    for i in range(n):
        disk = ((yy - res / 2) ** 2 + (xx - res / 2 - i) ** 2 < (res / 3) ** 2)
        alpha = np.repeat((disk * 255).astype(np.uint8)[None], views, 0)
        colour = rng.integers(0, 255, (views, 1, 1, 3))
        rgb = np.where(disk[None, :, :, None], colour, 255).astype(np.uint8)
        normal = np.where(disk[None, :, :, None], rng.integers(0, 255, (views, res, res, 3)), 255).astype(np.uint8)
        c2w = np.repeat(np.eye(4, dtype=np.float32)[None], views, 0)
        ids[f"id{i:05d}"] = dict(rgb=rgb, alpha=alpha, normal=normal, c2w=c2w,
                                 K=np.array([[40, 0, 8], [0, 40, 8], [0, 0, 1]], np.float32),
                                 yaw=np.linspace(0, 270, views).astype(np.float32),
                                 pitch=np.zeros(views, np.float32))
    write_external(root, ids, heldout=[f"id{n - 1:05d}"])


def test_latent_cache(tmp_path):
    run = Run(TINY, tmp_path / "run", device="cpu", seed=3)
    _tiny_dataset(run.data_dir)
    Run.mark_complete(run.data_dir)
    codec = LatentCodec(tiny_vae())
    cache = ensure_latent_cache(run, codec, progress=False)
    assert cache.ids == ["id00000", "id00001", "id00002"] and cache.split("heldout") == ["id00002"]
    assert cache.size_bytes > 0 and cache.index["encode_images_per_s"] > 0
    ds = HeadDataset(run.data_dir, "train")
    v = ds.views(1, [1, 3])
    d = cache.get("id00001", [1, 3])
    assert d["rgb"].shape == (2, 4, 8, 8) and d["bg"].shape == (2, 3)
    tol = dict(atol=2e-2, rtol=2e-3)                                 # stored as float16
    torch.testing.assert_close(d["rgb"], codec.encode(v["rgb"]), **tol)
    torch.testing.assert_close(d["normal"], codec.encode(v["normal_rgb"]), **tol)
    torch.testing.assert_close(d["rgb_bg"], codec.encode(composite(v["rgb"], v["alpha"], d["bg"])), **tol)
    torch.testing.assert_close(d["bg"], background_colours("id00001", 2, seed=3)[0].expand(2, 3))
    assert (d["rgb_bg"] - d["rgb"]).abs().max() > 0.05
    # every view of a sample on one colour: the second colour set differs from the first, each shared by all views
    d1 = cache.get("id00001", [1, 3], bg_set=1)
    assert torch.equal(d1["bg"][0], d1["bg"][1]) and not torch.equal(d1["bg"], d["bg"])
    torch.testing.assert_close(d1["rgb_bg"], codec.encode(composite(v["rgb"], v["alpha"], d1["bg"])), **tol)
    # reused as it is; rebuilt when the autoencoder changes
    stamp = (cache.folder / "id00000.safetensors").stat().st_mtime_ns
    ensure_latent_cache(run, codec, progress=False)
    assert (cache.folder / "id00000.safetensors").stat().st_mtime_ns == stamp
    other = LatentCodec(tiny_vae(), scale=1.3)
    d2 = ensure_latent_cache(run, other, progress=False).get("id00001", [1, 3])
    torch.testing.assert_close(d2["rgb"], codec.encode(v["rgb"]) / 0.7 * 1.3, **tol)
    with pytest.raises(KeyError, match="not in the latent cache"):
        cache.get("nobody")
    with pytest.raises(FileNotFoundError, match="ensure_latent_cache"):
        LatentCache(tmp_path / "nowhere")


def test_evaluate_codec_measures_the_face_apart_from_the_image(tmp_path):
    """A codec that loses only the face box keeps a high whole-image PSNR and a low face PSNR: the face figure
    sees what the image average hides."""
    from spinmeround_lite.dataset import build_dataset
    from spinmeround_lite.faces import face_box
    from spinmeround_lite.latents import evaluate_codec

    P = get_profile("test").replace(name="tiny", resolution=32, identities=3, heldout_identities=1,
                                    views_per_identity=8)
    build_dataset(tmp_path, P)
    ds = HeadDataset(tmp_path, "heldout")
    t, b, l, r = face_box(32)

    class Codec:                       # encode = identity; decode blurs the face box into its mean colour
        def encode(self, x):
            return x

        def decode(self, z):
            out = z.clone()
            out[..., t:b, l:r] = z[..., t:b, l:r].mean(dim=(-1, -2), keepdim=True)
            return out

    q = evaluate_codec(Codec(), ds)
    assert q["psnr_rgb"] > q["face_psnr_rgb"] + 5 and np.isfinite(q["face_psnr_rgb"])



class _Pool:
    """A stand-in ``ImagePool``: the same few images every batch."""

    def __init__(self, x):
        self.x = x

    def batch(self, n, generator=None, p_bg=0.5):
        return self.x[:n]

    def batch_with_face_weights(self, n, generator=None, face_weight=0.0, p_bg=0.5, face_region="frontal"):
        return self.x[:n], torch.ones(n, 1, *self.x.shape[-2:])


@pytest.mark.floats
def test_finetuning_the_decoder_keeps_the_latents_and_lowers_its_loss():
    from spinmeround_lite.latents import decoder_loss, finetune_decoder, vae_fingerprint

    vae = tiny_vae()
    x = torch.nn.functional.interpolate(images(4, res=4), size=16, mode="bilinear")    # smooth, learnable images
    before_z = LatentCodec(vae).encode(x)
    fp = vae_fingerprint(LatentCodec(vae))
    enc = {k: v.clone() for k, v in vae.state_dict().items() if not k.startswith(("decoder", "post_quant_conv"))}
    dec = {k: v.clone() for k, v in vae.state_dict().items() if k.startswith("decoder")}
    start = decoder_loss(vae, x)[0].item()
    history = finetune_decoder(vae, _Pool(x), steps=60, batch=4, lr=3e-3, progress=False)
    assert len(history) == 60
    # it learns the images it is shown: loss after / before 0.48 +- 0.06 (0.38 .. 0.55) over tiny_vae and image
    # seeds 0-5, native kernels and ATEN_CPU_CAPABILITY=default alike; an untrained decoder stays at 1
    assert decoder_loss(vae, x)[0].item() < 0.75 * start
    after = vae.state_dict()
    assert all(torch.equal(after[k], v) for k, v in enc.items())     # encoder and quant_conv untouched
    assert any(not torch.equal(after[k], v) for k, v in dec.items())
    torch.testing.assert_close(LatentCodec(vae).encode(x), before_z)
    assert vae_fingerprint(LatentCodec(vae)) == fp                   # caches and models made before stay valid


def test_the_latent_fingerprint_follows_the_encoder_and_the_scale():
    from spinmeround_lite.latents import vae_fingerprint

    vae = tiny_vae()
    fp = vae_fingerprint(LatentCodec(vae))
    assert vae_fingerprint(LatentCodec(vae, scale=0.5)) != fp
    with torch.no_grad():
        vae.encoder.conv_in.weight.add_(1e-3)
    assert vae_fingerprint(LatentCodec(vae)) != fp


def test_face_weights_fall_on_the_face_of_frontal_rgb_views(tmp_path):
    from spinmeround_lite.dataset import build_dataset
    from spinmeround_lite.faces import face_box
    from spinmeround_lite.latents import ImagePool

    P = get_profile("test").replace(name="tiny", resolution=32, identities=3, heldout_identities=1,
                                    views_per_identity=8)
    build_dataset(tmp_path, P)
    pool = ImagePool(HeadDataset(tmp_path, "train"), progress=False)
    assert pool.frontal.shape == (len(pool),) and 0 < pool.frontal.sum() < len(pool)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    x, w = pool.batch_with_face_weights(64, g1, face_weight=9.0)
    torch.testing.assert_close(x, pool.batch(64, g2))                 # the same images as batch() draws
    t, b, l, r = face_box(32)
    outside = w.clone()
    outside[..., t:b, l:r] = 1
    assert torch.all(outside == 1) and torch.all(w[1::2] == 1)        # normal maps (odd rows) unweighted
    boxes = w[..., t:b, l:r].flatten(1)
    assert torch.all((boxes == 1).all(1) | (boxes == 10).all(1)) and (boxes == 10).all(1).any()
    # each view's own projected face box: the same images, weights on the RGB views that see the face
    g3 = torch.Generator().manual_seed(5)
    xp, wp = pool.batch_with_face_weights(64, g3, face_weight=9.0, face_region="projected")
    torch.testing.assert_close(xp, x)
    assert set(wp.unique().tolist()) == {1.0, 10.0} and torch.all(wp[1::2] == 1)
    assert pool.face.shape == (len(pool), 32, 32) and pool.face.any(dim=(1, 2)).sum() > pool.frontal.sum()
    with pytest.raises(ValueError, match="face_region"):
        pool.batch_with_face_weights(4, face_region="nose")


def test_finetune_run_decoder_replaces_the_decoder_and_keeps_the_cache(tmp_path):
    """The run's autoencoder gets a new decoder, recorded with held-out figures before and after; the latent cache
    made with the old one is still the run's cache (nothing re-encoded)."""
    from spinmeround_lite.latents import finetune_run_decoder

    run = Run(TINY, tmp_path / "run", device="cpu", seed=3)
    _tiny_dataset(run.data_dir)
    Run.mark_complete(run.data_dir)
    with pytest.raises(FileNotFoundError, match="ensure_vae"):
        finetune_run_decoder(run, 2, progress=False)
    codec = ensure_vae(run, progress=False)
    cache = ensure_latent_cache(run, codec, progress=False)
    stamp = (cache.folder / "id00000.safetensors").stat().st_mtime_ns
    old = {k: v.clone() for k, v in codec.vae.state_dict().items()}
    rec = finetune_run_decoder(run, 3, progress=False)
    assert rec["steps"] == 3 and set(rec["heldout_after"]) >= {"psnr_rgb", "face_psnr_rgb", "normal_angle_err_deg"}
    assert Run.is_complete(run.model_dir("vae")) and not any(run.model_dir("vae").parent.glob("vae.*"))
    new = load_vae(run.model_dir("vae")).state_dict()
    assert all(torch.equal(new[k], v) for k, v in old.items() if k.startswith("encoder"))
    assert any(not torch.equal(new[k], v) for k, v in old.items() if k.startswith("decoder"))
    import json
    info = json.loads((run.model_dir("vae") / "train.json").read_text())
    assert "_name_or_path" not in json.loads((run.model_dir("vae") / "config.json").read_text())
    assert [r["steps"] for r in info["decoder_finetunes"]] == [TINY.vae_decoder_steps, 3]   # at build, then here
    ensure_latent_cache(run, ensure_vae(run, progress=False), progress=False)
    assert (cache.folder / "id00000.safetensors").stat().st_mtime_ns == stamp


def test_atomic_folder_swaps_in_only_a_whole_folder(tmp_path):
    from spinmeround_lite.runs import atomic_folder

    target = tmp_path / "vae"
    target.mkdir()
    (target / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_folder(target) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("interrupted")
    assert (target / "a.txt").read_text() == "old"                    # an interrupted write leaves the old folder
    with atomic_folder(target) as tmp:
        (tmp / "b.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae"]     # no .tmp or .old left behind
