"""Ray maps: where every latent pixel of every view looks, as channels the multi-view UNet can read.

METHOD.md section 2. For each view and each pixel of the *latent* grid we take the camera ray through the
pixel centre (``cameras.pixel_rays`` with the intrinsics scaled from image to latent resolution), and
NeRF-encode its origin (15 frequencies) and unit direction (8 frequencies)::

    origin     o / R   ->  3 + 6 * 15 = 93 channels   (channels   0 ..  92)
    direction  d       ->  3 + 6 *  8 = 51 channels   (channels  93 .. 143)
                                        144 channels  (+ 1 mask channel, ``mask_channel``)

Channel order of ``nerf_encode`` (for one 3-vector ``x = (x0, x1, x2)`` and ``n`` frequencies)::

    [x0, x1, x2,
     sin(2^0 x0), sin(2^0 x1), sin(2^0 x2), cos(2^0 x0), cos(2^0 x1), cos(2^0 x2),
     sin(2^1 x0), ...                                    cos(2^1 x2),
     ...
     sin(2^(n-1) x0), ...                                cos(2^(n-1) x2)]

i.e. channel ``3 + 6k + j`` is ``sin(2^k x_j)`` and channel ``3 + 6k + 3 + j`` is ``cos(2^k x_j)``. The raw
vector comes first, so the ray itself is read straight back: ``o = R * rm[:, 0:3]``, ``d = rm[:, 93:96]``.

Scale of the origins: ``o / R`` with ``R`` the rig radius (``cameras.RADIUS`` = 2.7), so every camera centre
lies on the unit sphere. Three reasons: (1) the encoding no longer depends on the world units of the data
(renders made at another radius give the same ray map when given their radius); (2) the lowest frequency is
injective, ``sin(x)`` is monotone on ``[-1, 1]``; (3) frequency ``2^k`` resolves a change of camera position of
about ``2^-k`` radians of orbit, so the first 5-6 origin frequencies separate neighbouring rig views (about 3
degrees apart) and the higher ones act as a fine, hash-like code of the exact position, as in the paper.
Directions are unit vectors already; a latent pixel subtends about ``13.4 / h`` degrees.

Which frequencies. NeRF's ladder is ``2^0 .. 2^(n-1)``, and the released model uses it (``paper`` profile). For the
origins it reaches ``2^14``: on the unit sphere ``sin(2^14 x)`` changes sign between cameras a hundredth of a degree
apart, i.e. it is a hash of the camera, not a description of it. A model trained on a fixed rig can learn those
hashes as ``V`` codes; at any other camera (the evaluation's yaws, a spin's) the top 10 or so bands are new random
numbers, and a small model trained briefly does not learn to ignore them (notebook 07 measures the effect). Likewise,
at 16x16 latents the direction band ``2^7`` has a period of about 2.4 latent pixels, at the edge of aliasing.
So the course's own profiles start both ladders lower, keeping the channel count (``ray_origin_min_freq_log2``,
``ray_dir_min_freq_log2``): origins ``2^-11 .. 2^3`` (the top band still tells cameras 3 degrees apart; the
bottom bands are nearly linear in ``x``), directions ``2^-1 .. 2^6`` at 16x16 latents (a period of at least about
5 latent pixels). Shifting a ladder changes no shape: 144 channels either way.
"""

from __future__ import annotations

import math

import torch

from . import cameras

ORIGIN_FREQS = 15
DIR_FREQS = 8


def encoded_channels(n_freqs: int) -> int:
    """Channels of ``nerf_encode`` for a 3-vector: ``3 + 6 * n_freqs``."""
    return 3 + 6 * n_freqs


def raymap_channels(origin_freqs: int = ORIGIN_FREQS, dir_freqs: int = DIR_FREQS) -> int:
    """Channels of a ray map: 93 + 51 = 144 for the paper's 15 and 8 frequencies."""
    return encoded_channels(origin_freqs) + encoded_channels(dir_freqs)


def nerf_encode(x: torch.Tensor, n_freqs: int, min_freq_log2: int = 0) -> torch.Tensor:
    """NeRF positional encoding ``gamma(x)``. x (..., 3) -> (..., 3 + 6 * n_freqs).

    Order: ``x``, then for ``k = 0 .. n_freqs - 1`` the three ``sin(f_k x_j)`` followed by the three
    ``cos(f_k x_j)`` (see the module docstring for channel indices), ``f_k = 2^(min_freq_log2 + k)``
    (NeRF's ladder ``2^0 .. 2^(n-1)`` with the default 0; a negative start moves the whole ladder down an octave
    per step, same channel count).
    """
    if x.shape[-1] != 3:
        raise ValueError(f"nerf_encode expects 3-vectors (..., 3), got shape {tuple(x.shape)}")
    freqs = 2.0 ** (torch.arange(n_freqs, dtype=x.dtype, device=x.device) + min_freq_log2)   # (n,)
    xf = x[..., None, :] * freqs[:, None]                                    # (..., n, 3)
    sc = torch.cat([torch.sin(xf), torch.cos(xf)], dim=-1)                   # (..., n, 6)
    return torch.cat([x, sc.flatten(-2)], dim=-1)


def scale_intrinsics(K: torch.Tensor, image_res: int, latent_res: int) -> torch.Tensor:
    """Intrinsics (..., 3, 3) of an ``image_res`` image rescaled to a ``latent_res`` grid.

    With pixel centres at ``u + 0.5`` (``cameras`` convention), scaling ``fx, fy, cx, cy`` by
    ``s = latent_res / image_res`` makes latent pixel ``(u, v)`` look through the centre of the
    ``1/s x 1/s`` block of image pixels it covers.
    """
    s = latent_res / image_res
    K = K.clone()
    K[..., :2, :] = K[..., :2, :] * s
    return K


def latent_rays(c2w: torch.Tensor, K: torch.Tensor, image_res: int, latent_res: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """World ray origins and unit directions through latent-pixel centres.

    c2w (..., 4, 4), K (..., 3, 3) or (3, 3) in pixels of the ``image_res`` image
    -> origins (..., h, w, 3), directions (..., h, w, 3) with ``h = w = latent_res``.
    """
    if c2w.shape[-2:] != (4, 4):
        raise ValueError(f"c2w must be (..., 4, 4), got {tuple(c2w.shape)}")
    if K.shape[-2:] != (3, 3):
        raise ValueError(f"K must be (..., 3, 3) or (3, 3), got {tuple(K.shape)}")
    c2w = c2w.float()
    K = scale_intrinsics(K.to(c2w), image_res, latent_res)
    K = K.expand(*c2w.shape[:-2], 3, 3)
    return cameras.pixel_rays(c2w, K, latent_res, latent_res)


def raymap(c2w: torch.Tensor, K: torch.Tensor, image_res: int, latent_res: int,
           origin_freqs: int = ORIGIN_FREQS, dir_freqs: int = DIR_FREQS,
           radius: float = cameras.RADIUS, origin_min_freq_log2: int = 0, dir_min_freq_log2: int = 0
           ) -> torch.Tensor:
    """The ray map of each view. c2w (..., 4, 4), K (..., 3, 3) or (3, 3) -> (..., 144, h, w).

    Channels: ``nerf_encode(o / radius, origin_freqs, origin_min_freq_log2)`` then
    ``nerf_encode(d, dir_freqs, dir_min_freq_log2)`` (93 + 51 = 144 with the defaults). ``h = w = latent_res``;
    ``K`` is in pixels of the ``image_res`` image. The ``*_min_freq_log2`` start the frequency ladders lower
    (``profile_raymap`` reads them from a profile; module docstring, "Which frequencies").
    """
    o, d = latent_rays(c2w, K, image_res, latent_res)                        # (..., h, w, 3) each
    enc = torch.cat([nerf_encode(o / radius, origin_freqs, origin_min_freq_log2),
                     nerf_encode(d, dir_freqs, dir_min_freq_log2)], dim=-1)
    return enc.movedim(-1, -3).contiguous()                                  # (..., C, h, w)


def profile_raymap(profile, c2w: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """``raymap`` with every setting read from a profile (resolution, latent resolution, both frequency ladders,
    and the camera convention: ``profile.extra["camera_convention"] == "released"`` gives ``raymap_in``'s released
    maps, what the released weights were trained on).

    The one call the trainer, the samplers and the evaluation use, so a model always sees the ray maps it was
    trained with. c2w (..., 4, 4), K (..., 3, 3) or (3, 3) -> (..., 144, h, w).
    """
    if profile.extra.get("camera_convention", "opencv") == "released":
        return raymap_in("released", c2w, K, profile.resolution, profile.latent_res, profile.ray_origin_freqs,
                         profile.ray_dir_freqs)
    return raymap(c2w, K, profile.resolution, profile.latent_res, profile.ray_origin_freqs, profile.ray_dir_freqs,
                  origin_min_freq_log2=profile.ray_origin_min_freq_log2,
                  dir_min_freq_log2=profile.ray_dir_min_freq_log2)


def decode_rays(rm: torch.Tensor, origin_freqs: int = ORIGIN_FREQS, radius: float = cameras.RADIUS
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Read the rays back from a ray map. rm (..., C, h, w) -> origins, directions (..., h, w, 3)."""
    i = encoded_channels(origin_freqs)
    o = rm[..., 0:3, :, :].movedim(-3, -1) * radius
    d = rm[..., i:i + 3, :, :].movedim(-3, -1)
    return o, d


def mask_channel(mask: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The binary mask channel: 1 for given (conditioning) views, 0 for views to generate.

    mask (..., V) bool -> (..., V, 1, h, w) float.
    """
    mask = torch.as_tensor(mask)
    return mask.float()[..., None, None, None].expand(*mask.shape, 1, h, w).contiguous()


# ----------------------------------------------------------------------------------------------
# the released SpinMeRound code's ray maps (a named option, used with the released weights)
# ----------------------------------------------------------------------------------------------
# ``cameras`` (end of the module) lists the six ways the released convention differs from the course's. The
# functions below compute its ray maps with the same operations in the same order, so that in float32 they
# agree with the released code's own float32 numbers and in float64 with its float64 ones (tests/test_released.py;
# the two precisions differ by up to 4e-3 in the highest origin frequencies, 2^12 .. 2^14 times 2.7).
# Give them float64 (``dtype``) to compare across implementations; the model itself was fed float32.
CONVENTIONS = ("opencv", "released")


def released_encode(x: torch.Tensor, n_freqs: int) -> torch.Tensor:
    """The released NeRF encoding: x (..., 3) -> (..., 3 + 6 n) = ``[x, sin(2^k x_j) ..., cos(2^k x_j) ...]``.

    All sines come first (frequency-major: ``sin(2^0 x0), sin(2^0 x1), sin(2^0 x2), sin(2^1 x0), ...``), then all
    cosines in the same order, each computed as ``sin(y + pi / 2)``. (The course's ``nerf_encode`` interleaves
    sines and cosines per frequency: the same numbers in another order.)
    """
    scales = torch.tensor([2 ** i for i in range(n_freqs)], device=x.device)
    xb = (x[..., None, :] * scales[:, None]).reshape(*x.shape[:-1], -1)
    return torch.cat([x, torch.sin(torch.cat([xb, xb + math.pi / 2.0], dim=-1))], dim=-1)


def released_rays(w2c: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ray origins and (unnormalised) directions (H, W, 3) of one released camera, world-to-camera ``w2c`` (4, 4).

    Pixel ``(i, j)`` (column, row, integers) looks along ``((i - W/2) / f, -(j - H/2) / f, -1)`` in OpenGL
    camera axes with ``f = cameras.RELEASED_FOCAL``, rotated to the world by ``inverse(w2c)``; every origin is
    the camera centre. Computed in ``w2c.dtype``.
    """
    c2w = torch.linalg.inv(w2c)
    ii, jj = torch.meshgrid(torch.arange(width, dtype=w2c.dtype), torch.arange(height, dtype=w2c.dtype),
                            indexing="ij")
    ii, jj = ii.transpose(-1, -2), jj.transpose(-1, -2)                       # (H, W): column, row
    f = torch.tensor(cameras.RELEASED_FOCAL, dtype=w2c.dtype)
    d_cam = torch.stack([(ii - width * 0.5) / f, -(jj - height * 0.5) / f, -torch.ones_like(ii)], dim=-1)
    d = torch.sum(d_cam[..., None, :] * c2w[:3, :3], dim=-1)                  # R^T d_cam, summed as coded there
    return c2w[:3, -1].expand(d.shape), d


def released_raymap(angles_deg=None, height: int = 64, width: int | None = None, w2c: torch.Tensor | None = None,
                    origin_freqs: int = ORIGIN_FREQS, dir_freqs: int = DIR_FREQS,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Released ray maps (..., 144, H, W) of cameras named by angles (..., 3) in degrees, or by ``w2c`` (..., 4, 4).

    Channels: ``released_encode(origin, 15)`` (93) then ``released_encode(direction, 8)`` (51), origins and
    directions as ``released_rays`` gives them (not scaled, not normalised). ``height x width`` is the latent
    grid (64 x 64 for the released model).
    """
    width = width or height
    if w2c is None:
        if angles_deg is None:
            raise ValueError("give the cameras as angles_deg (..., 3) or as w2c (..., 4, 4)")
        w2c = cameras.released_w2c(angles_deg, dtype)
    w2c = torch.as_tensor(w2c).to(dtype)
    flat = w2c.reshape(-1, 4, 4)
    maps = []
    for m in flat:
        o, d = released_rays(m, height, width)
        maps.append(torch.cat([released_encode(o, origin_freqs), released_encode(d, dir_freqs)], dim=-1))
    out = torch.stack(maps).permute(0, 3, 1, 2).contiguous()                 # (N, C, H, W)
    return out.reshape(*w2c.shape[:-2], *out.shape[1:])


def raymap_in(convention: str, c2w: torch.Tensor, K: torch.Tensor, image_res: int, latent_res: int,
              origin_freqs: int = ORIGIN_FREQS, dir_freqs: int = DIR_FREQS,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ray map of course cameras ``c2w`` (..., 4, 4) in a named convention: ``"opencv"`` (the course's,
    ``raymap``) or ``"released"`` (the released code's, for the released weights).

    For ``"released"`` only the rotation of each ``c2w`` matters and ``K``, ``image_res`` are not used (that
    convention fixes centre and focal, ``cameras.released_w2c_from_c2w``); ``latent_res`` is the grid side.
    """
    if convention == "opencv":
        return raymap(c2w, K, image_res, latent_res, origin_freqs, dir_freqs).to(dtype)
    if convention == "released":
        w2c = cameras.released_w2c_from_c2w(torch.as_tensor(c2w).to(torch.float64))
        return released_raymap(w2c=w2c, height=latent_res, width=latent_res, origin_freqs=origin_freqs,
                               dir_freqs=dir_freqs, dtype=dtype)
    raise ValueError(f"unknown camera convention {convention!r}: choose one of {', '.join(CONVENTIONS)}")
