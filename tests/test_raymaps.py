import math

import pytest
import torch

from spinmeround_lite import cameras as C
from spinmeround_lite import raymaps as R


def test_encoding_shape_and_channel_order():
    x = torch.tensor([[0.3, -0.7, 1.1]])
    n = 4
    e = R.nerf_encode(x, n)
    assert e.shape == (1, 3 + 6 * n)
    torch.testing.assert_close(e[0, :3], x[0])
    for k in range(n):
        for j in range(3):
            assert e[0, 3 + 6 * k + j].item() == pytest.approx(math.sin(2 ** k * x[0, j].item()), abs=1e-6)
            assert e[0, 3 + 6 * k + 3 + j].item() == pytest.approx(math.cos(2 ** k * x[0, j].item()), abs=1e-6)


@pytest.mark.floats
def test_raymap_has_144_channels_at_latent_resolution():
    # float32 rounding, ATEN_CPU_CAPABILITY=default and native, one thread: origins exact, |d| - 1 at most 1.2e-7
    yaw, pitch = C.rig_angles(6)
    c2w = C.orbit_c2w(yaw, pitch)
    rm = R.raymap(c2w, C.intrinsics(64), image_res=64, latent_res=8)
    assert rm.shape == (6, 144, 8, 8) and R.raymap_channels() == 144
    # batched (B, V) cameras with per-view intrinsics give the same maps
    rm2 = R.raymap(c2w.reshape(2, 3, 4, 4), C.intrinsics(64).expand(2, 3, 3, 3), 64, 8)
    torch.testing.assert_close(rm2.reshape(6, 144, 8, 8), rm)
    # the origin is constant over a view and on the unit sphere after dividing by the radius
    o, d = R.decode_rays(rm)
    torch.testing.assert_close(o, c2w[:, None, None, :3, 3].expand_as(o), atol=1e-5, rtol=0)
    torch.testing.assert_close(d.norm(dim=-1), torch.ones(6, 8, 8))


@pytest.mark.floats
@pytest.mark.parametrize("latent_res", [9, 16])
def test_center_ray_of_every_rig_camera_hits_look_at(latent_res):
    # the largest miss 5.5e-7 on both kernel paths; tolerance 1e-5
    yaw, pitch = C.rig_angles(125)
    c2w = C.orbit_c2w(yaw, pitch)
    rm = R.raymap(c2w, C.intrinsics(64), image_res=64, latent_res=latent_res)
    o, d = R.decode_rays(rm)
    c = latent_res // 2
    if latent_res % 2:           # a pixel centre sits on the optical axis
        oc, dc = o[:, c, c], d[:, c, c]
    else:                        # the axis passes between the four central pixels
        oc = o[:, c, c]
        dc = torch.nn.functional.normalize(d[:, c - 1:c + 1, c - 1:c + 1].mean((1, 2)), dim=-1)
    target = torch.tensor(C.LOOK_AT)
    t = ((target - oc) * dc).sum(-1, keepdim=True)
    miss = (oc + t * dc - target).norm(dim=-1)
    assert miss.max() < 1e-5


@pytest.mark.floats
def test_latent_pixels_look_through_image_block_centres():
    # at most 1.2e-5 px on both kernel paths; tolerance 1e-3 px; a half-pixel offset would be 0.5 px off
    # latent pixel (u, v) of a 4x downsampled grid looks through image point (4u + 2, 4v + 2)
    c2w = C.orbit_c2w(35.0, -10.0)
    K = C.intrinsics(32)
    o, d = R.latent_rays(c2w, K, 32, 8)
    p = o + 2.0 * d                                                  # (8, 8, 3)
    uv, z = C.project(p.reshape(-1, 3), C.w2c_from_c2w(c2w), K)
    v, u = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    expected = torch.stack([4 * u + 2, 4 * v + 2], -1).reshape(-1, 2)
    torch.testing.assert_close(uv, expected, atol=1e-3, rtol=0)


def test_mask_channel():
    m = R.mask_channel(torch.tensor([True, False, False]), 4, 5)
    assert m.shape == (3, 1, 4, 5) and m.dtype == torch.float32
    assert m[0].min() == 1 and m[1:].max() == 0


@pytest.mark.floats
def test_raymap_rays_hit_the_rendered_points():
    # the renderer of notebook 00 traced these same pixels: origin + depth * direction must be its hit point
    from spinmeround_lite import heads, render

    yaw, pitch = torch.tensor([0.0, 70.0, 180.0]), torch.tensor([0.0, 15.0, -20.0])
    c2w, K = C.orbit_c2w(yaw, pitch), C.intrinsics(64)
    lat = 16
    Kl = R.scale_intrinsics(K, 64, lat)                       # render directly at the latent grid
    out = render.render_views(heads.sample_identity(3), c2w, Kl, lat, lat, ao=False)
    hit = out["alpha"] > 0.999
    assert hit.sum() > 50
    o, d = R.decode_rays(R.raymap(c2w, K, image_res=64, latent_res=lat))
    p = o + out["depth"][..., None].nan_to_num(posinf=0.0) * d
    torch.testing.assert_close(p[hit], out["points"][hit], atol=1e-5, rtol=0)
    # and those points lie on the head's surface (the depth is the distance along the unit ray), within the
    # renderer's tolerance of half a pixel footprint
    sdf = heads.Head(heads.sample_identity(3)).sdf(p[hit])
    assert (sdf.abs() < 0.5 * out["depth"][hit] / Kl[0, 0]).all()
