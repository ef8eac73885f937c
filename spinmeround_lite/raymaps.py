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
Directions are unit vectors already; a latent pixel subtends about ``13.4 / h`` degrees, which the top
direction frequency ``2^7`` resolves to a few pixels.
"""

from __future__ import annotations

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


def nerf_encode(x: torch.Tensor, n_freqs: int) -> torch.Tensor:
    """NeRF positional encoding ``gamma(x)``. x (..., 3) -> (..., 3 + 6 * n_freqs).

    Order: ``x``, then for ``k = 0 .. n_freqs - 1`` the three ``sin(2^k x_j)`` followed by the three
    ``cos(2^k x_j)`` (see the module docstring for channel indices).
    """
    if x.shape[-1] != 3:
        raise ValueError(f"nerf_encode expects 3-vectors (..., 3), got shape {tuple(x.shape)}")
    freqs = 2.0 ** torch.arange(n_freqs, dtype=x.dtype, device=x.device)   # (n,)
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
           radius: float = cameras.RADIUS) -> torch.Tensor:
    """The ray map of each view. c2w (..., 4, 4), K (..., 3, 3) or (3, 3) -> (..., 144, h, w).

    Channels: ``nerf_encode(o / radius, origin_freqs)`` then ``nerf_encode(d, dir_freqs)``
    (93 + 51 = 144 with the defaults). ``h = w = latent_res``; ``K`` is in pixels of the ``image_res`` image.
    """
    o, d = latent_rays(c2w, K, image_res, latent_res)                        # (..., h, w, 3) each
    enc = torch.cat([nerf_encode(o / radius, origin_freqs), nerf_encode(d, dir_freqs)], dim=-1)
    return enc.movedim(-1, -3).contiguous()                                  # (..., C, h, w)


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
