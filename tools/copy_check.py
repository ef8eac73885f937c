"""Does the model use the given view's face? One denoising step on true latents near the input, view given or not.

    python tools/copy_check.py --model reference/cpu/spin --run-dir <reference run folder> --extra-identities 336

For each held-out head: the frontal view (given) and the dataset views nearest 8, 16 and 24 degrees to either side
and the back (targets). The targets' *true* latents get noise of level sigma; the model denoises them in one call,
once with the true frontal latent given and once with it zeroed (the rest identical: noise, cameras, identity),
and once given without the identity embedding. Printed per sigma: the PSNR inside the face box
(``faces.face_box``) of the decoded result against the decoded truth, for the six near targets, and of the noisy
input itself; and once, the PSNR of the given view's face pasted as it is onto each target (a verbatim copy).

How to read it. At low noise the target's own latent holds its face, so the given view adds little whatever the
model does (and a verbatim copy is no better: the face has moved a pixel or two). At pure noise (sigma 40) only
the given view and what the model learned are left: a model that ignores its input sits at the zeroed figure, one
that copies at about the copy figure, one that moves the face with the camera above it. The result is a one-step
prediction, a mean over what the face could be: this checks *use*, not sharpness.
The run folder is a training run (its data, autoencoder and identity embeddings); the held-out heads are never
trained on.

The course's own version is ``checks.input_use`` (notebook 07, section 9): one level (pure noise), rendered truth at
chosen angles, with a picture. This tool is the campaign's wider look at the same question: the dataset's views,
seven noise levels and the identity embedding taken away, for comparing checkpoints.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spinmeround_lite import metrics  # noqa: E402
from spinmeround_lite.faces import face_box  # noqa: E402
from spinmeround_lite.latents import ensure_vae  # noqa: E402
from spinmeround_lite.model import SpinModel  # noqa: E402
from spinmeround_lite.profiles import get_profile  # noqa: E402
from spinmeround_lite.runs import Run  # noqa: E402
from spinmeround_lite.spinning import wrap_yaw  # noqa: E402
from spinmeround_lite.train import TrainData, frontal_view  # noqa: E402

OFFSETS = (8, -8, 16, -16, 24, -24, 180)     # target yaws relative to the given view; the last is the back
SIGMAS = (0.05, 0.2, 0.5, 1.0, 2.0, 5.0, 40.0)     # 40: pure noise, only the given view and the prior are left


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--run-dir", required=True, help="the training run folder of the model")
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--extra-identities", type=int, default=0, help="as the run was trained with")
    a = ap.parse_args()
    p = get_profile(a.profile).replace(use_reference=False, extra_train_identities=a.extra_identities)
    run = Run(p, a.run_dir, notebook="copy_check", seed=0)
    data = TrainData(run, progress=False)
    codec = ensure_vae(run, progress=False)
    model = SpinModel.load(a.model, p).eval()
    ds = data.heldout
    x0, rays, emb = [], [], []
    for i in range(len(ds)):
        _, _, yaw, pitch = data.camera(ds, i)
        idx = [frontal_view(yaw, pitch)]
        for o in OFFSETS:
            d = wrap_yaw(yaw - (yaw[idx[0]] + o)).abs() + 3 * pitch.abs()
            d[idx] = float("inf")
            idx.append(int(d.argmin()))
        x0.append(data.latents(ds.ids[i], idx))
        rays.append(data.rays(ds, i, idx))
        emb.append(data.id_emb[ds.ids[i]])
    x0, rays, emb = torch.stack(x0), torch.stack(rays), torch.stack(emb)
    B, V = x0.shape[:2]
    mask = torch.zeros(B, V, dtype=torch.bool)
    mask[:, 0] = True
    top, bottom, left, right = face_box(p.resolution)
    R = p.resolution

    def faces_of(z):                                         # the six near targets, decoded, face box only
        return codec.decode(z[:, 1:7, :4].flatten(0, 1)).view(B * 6, 3, R, R)[..., top:bottom, left:right]

    truth = faces_of(x0)
    copied = faces_of(x0[:, :1].expand(B, V, *x0.shape[2:]))   # the given view's face pasted as it is
    copy_db = metrics.psnr(copied, truth).mean().item()
    print(f"the given view's face copied as it is: {copy_db:.2f} dB", flush=True)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    out = {"model": a.model, "heads": B, "offsets": list(OFFSETS), "copy_db": round(copy_db, 2), "face_psnr_db": {}}
    with torch.no_grad():
        for s in SIGMAS:
            x = torch.where(mask[:, :, None, None, None], x0, x0 + s * noise)
            row = {"noisy": metrics.psnr(faces_of(x), truth).mean().item()}
            for name, cond, e in (("given", x0, emb), ("zeroed", torch.zeros_like(x0), emb), ("given_no_id", x0, None)):
                D = model.denoise(x, torch.full((B,), s), cond, mask, rays, e)
                row[name] = metrics.psnr(faces_of(D), truth).mean().item()
            out["face_psnr_db"][str(s)] = {k: round(v, 2) for k, v in row.items()}
            print(f"sigma {s}: given {row['given']:.2f} dB, zeroed {row['zeroed']:.2f}, no identity "
                  f"{row['given_no_id']:.2f}, noisy input {row['noisy']:.2f}", flush=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
