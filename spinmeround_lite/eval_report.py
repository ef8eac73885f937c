"""The report: the results table next to the paper's, the table of differences, the per-angle plots.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np

from .eval_scoring import METRICS
from .eval_stats import BOOTSTRAP, REFERENCE_ROWS, comparisons, paired_bootstrap

METRIC_LABELS = {"l2": "L2 ↓", "ssim": "SSIM ↑", "lpips": "LPIPS ↓", "id_sim_cond": "ID cond ↑",
                 "id_sim_eval": "ID eval ↑", "normal_angle_err_deg": "Normal err ° ↓", "face_found": "face found"}
# The paper's table (METHOD.md section 7): L2, LPIPS, SSIM, ID ArcFace, ID VGGFace on NeRSemble, 16 angles.
PAPER_TABLE = {
    "PanoHead": {"l2": 0.012, "lpips": 0.32, "ssim": 0.65, "id_sim_cond": 0.27, "id_sim_eval": 0.88},
    "SV3D": {"l2": 0.087, "lpips": 0.41, "ssim": 0.66, "id_sim_cond": 0.36, "id_sim_eval": 0.881},
    "DiffPortrait3D": {"l2": 0.1, "lpips": 0.5, "ssim": 0.35, "id_sim_cond": 0.55, "id_sim_eval": 0.887},
    "SpinMeRound": {"l2": 0.033, "lpips": 0.30, "ssim": 0.73, "id_sim_cond": 0.61, "id_sim_eval": 0.911},
}
PAPER_ABLATION_NOTE = ("The paper reports the full model best on L2, LPIPS and SSIM against the same three "
                       "ablations (no input image, no identity embedding, no normal generation).")
ABLATION_LABELS = {"full_same_budget": "**full model, ablation budget**",
                   "full_same_heads": "**full model, the ablations' heads**",
                   "no_input_image": "w/o input image (identity only)", "no_identity": "w/o identity embedding",
                   "no_normals": "w/o normal generation (image only)"}
BASELINE_LABELS = {"copy_input": "input view copied to every angle", "mean_head": "mean training head",
                   "no_3d_attention": "model, 3D attention off (2D)"}


def _fmt(v, digits=3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{digits}f}"


def results_table(results: dict, profile: str, note: str = "") -> str:
    """Markdown tables laid out like the paper's: the paper's published rows, then ours (model, baselines),
    then the ablations; LPIPS and missing figures as ``n/a`` with their reason below.

    ``results``: ``{"model": {...}, "baselines": {name: {...}}, "ablations": {name: {...}}}`` from
    ``evaluate_method``.
    """
    cols = ["l2", "lpips", "ssim", "id_sim_cond", "id_sim_eval", "normal_angle_err_deg", "face_found"]
    head = ("| method | source | L2 ↓ | LPIPS ↓ | SSIM ↑ | ID ArcFace / cond ↑ | ID VGGFace / eval ↑ "
            "| normal err (deg) ↓ | face found (vs truth) |\n|---|---|---|---|---|---|---|---|---|")
    lines = [f"## Evaluation ({profile} profile)", "",
             "Ours are measured on held-out **procedural heads at small scale** (this course's synthetic data, "
             f"profile `{profile}`), the paper's on NeRSemble photographs at 512 px; the numbers are not "
             "comparable across the two, only the layout and the orderings are. Identity similarity uses the "
             "course's conditioning encoder in the ArcFace column and its independent evaluation encoder in the "
             "VGGFace column. *Face found*: the fraction of views in which dlib's (frontal) face detector finds a "
             "face, to read against the true views' own rate (their row): the detector misses faces turned past "
             "about 45 degrees, so the truth's rate is the target, and more is not better (the copied input shows "
             "a frontal face at the back of the head).",
             ""]
    lines += ["### Novel views against the truth (paper Table 1 layout)", "", head]
    for name, row in PAPER_TABLE.items():
        lines.append(f"| {name} (paper) | published | " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
    model = results.get("model")
    if model:
        lines.append(f"| **ours: full model** | {model.get('source', '')} | "
                     + " | ".join(_fmt(model.get(c)) for c in cols) + " |")
    for name, row in results.get("baselines", {}).items():
        lines.append(f"| baseline: {BASELINE_LABELS.get(name, name)} | {row.get('source', '')} | "
                     + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
    if results.get("truth"):
        lines.append("| *the true views (ceiling)* | rendered | "
                     + " | ".join(_fmt(results["truth"].get(c)) for c in cols) + " |")
    if results.get("autoencoder"):
        lines.append("| *the true views through the autoencoder (a latent model's ceiling)* | encoded and decoded | "
                     + " | ".join(_fmt(results["autoencoder"].get(c)) for c in cols) + " |")
    if results.get("ablations"):
        lines += ["", "### Ablations (paper: full model best on L2, LPIPS, SSIM)", "", head]
        if model and not set(REFERENCE_ROWS) & set(results["ablations"]):
            lines.append(f"| **full model** | {model.get('source', '')} | "
                         + " | ".join(_fmt(model.get(c)) for c in cols) + " |")
        for name, row in results["ablations"].items():
            lines.append(f"| {ABLATION_LABELS.get(name, name)} | {row.get('source', '')} | "
                         + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
    reasons = {}
    for group in [{"model": model}, results.get("baselines", {}), results.get("ablations", {})]:
        for name, row in group.items():
            for c in cols:
                if row and row.get(c) is None and row.get(f"{c}_reason"):
                    reasons.setdefault(row[f"{c}_reason"], []).append(f"{name}: {c}")
    if reasons:
        lines += ["", "n/a:"]
        for why, where in reasons.items():
            lines.append(f"- {', '.join(where)}: {why}")
    if results.get("ordering") or model:
        lines += ["", "### Differences with 95% paired bootstrap intervals over identities", "",
                  "Full model minus each method, mean over identities and angles; the interval resamples the "
                  f"identities ({BOOTSTRAP} times, the same resample for both methods). ✓: the interval excludes 0 "
                  "in the full model's favour (lower L2 and normal error, higher SSIM and identity similarity).", "",
                  differences_table(results)]
    if note:
        lines += ["", "### Does the full model win?", "", note]
    return "\n".join(lines) + "\n"


def differences_table(results: dict, metrics_: Iterable[str] = ("l2", "ssim", "id_sim_eval",
                                                                 "normal_angle_err_deg")) -> str:
    """Markdown: full model minus each baseline and ablation, mean and 95 % paired bootstrap interval."""
    stats = (results.get("ordering") or {}).get("stats") or comparisons(results)
    metrics_ = list(metrics_)
    lines = ["| full model minus | " + " | ".join(METRIC_LABELS.get(m, m) for m in metrics_) + " |",
             "|---|" + "---|" * len(metrics_)]
    for group, labels in (("baselines", BASELINE_LABELS), ("ablations", ABLATION_LABELS)):
        for name, st in stats.get(group, {}).items():
            cells = []
            for m in metrics_:
                r = st.get(m)
                cells.append("n/a" if r is None else f"{r['mean']:+.4f} [{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}]"
                             + (" ✓" if r["beats"] else ""))
            lines.append(f"| {group[:-1]}: {labels.get(name, name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_per_angle(results: dict, metric_names: Iterable[str] = METRICS, ncols: int = 3):
    """One panel per metric: value against yaw (0 = the input view, +-180 = the back of the head) for the
    model, each baseline and each ablation. Returns the matplotlib figure."""
    import matplotlib.pyplot as plt

    rows = [("full model", results.get("model"), dict(lw=2.5, color="k"))]
    rows += [(f"baseline: {n}", r, dict(ls="--")) for n, r in results.get("baselines", {}).items()]
    rows += [(f"ablation: {n}", r, dict(ls=":")) for n, r in results.get("ablations", {}).items()]
    if results.get("truth"):
        rows.append(("true views", results["truth"], dict(color="0.6", lw=1)))
    if results.get("autoencoder"):
        rows.append(("through the autoencoder", results["autoencoder"], dict(color="0.6", lw=1, ls="-.")))
    names = list(metric_names)
    nrows = math.ceil(len(names) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
    for ax, m in zip(axes.flat, names):
        for label, r, style in rows:
            if not r or (r.get("per_angle") or {}).get(m) is None:
                continue
            yaw = np.asarray(r["per_angle"]["yaw"])
            order = np.argsort(yaw)
            line, = ax.plot(yaw[order], np.asarray(r["per_angle"][m])[order], marker="o", ms=3, label=label, **style)
            table = (r.get("table") or {}).get(m)
            if table is not None and len(table) >= 2:            # 95 % bootstrap interval of the mean over identities
                t = np.asarray(table)
                ci = paired_bootstrap(t, np.zeros_like(t))["ci95"]
                ax.fill_between(yaw[order], np.asarray(ci[0])[order], np.asarray(ci[1])[order],
                                color=line.get_color(), alpha=0.15, lw=0)
        ax.set_title(METRIC_LABELS.get(m, m))
        ax.set_xlabel("yaw (deg): 0 front, ±180 back")
        if not ax.lines:
            why = (results.get("model") or {}).get(f"{m}_reason") or "not measured"
            import textwrap
            ax.text(0.5, 0.5, "n/a\n" + "\n".join(textwrap.wrap(why, 38)[:5]), ha="center", va="center",
                    transform=ax.transAxes, fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    handles, labels = next(((a.get_legend_handles_labels()) for a in axes.flat if a.lines), ([], []))
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig
