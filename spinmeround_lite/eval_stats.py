"""Statistics of the comparisons: paired bootstrap intervals over identities, and the ordering the paper reports.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from .eval_scoring import LOWER_IS_BETTER, METRICS

BOOTSTRAP = 2000         # resamples of the identities for every interval
# rows of the ablation group that are the full model the ablations are compared with, not ablations: the full model
# trained with the ablations' budget, or the run's model on the heads the ablations ran on
REFERENCE_ROWS = ("full_same_budget", "full_same_heads")


def ablation_reference(results: dict) -> tuple[str | None, dict]:
    """The full model the ablations are compared with: ``(name, row)`` of a ``REFERENCE_ROWS`` entry of
    ``results["ablations"]`` when there is one, else ``(None, results["model"])``."""
    abl = results.get("ablations") or {}
    for name in REFERENCE_ROWS:
        if name in abl:
            return name, abl[name]
    return None, results.get("model") or {}


def paired_bootstrap(a, b, n_boot: int = BOOTSTRAP, seed: int = 0, level: float = 0.95) -> dict:
    """The mean difference ``a - b`` over paired units (identities) and its percentile bootstrap interval.

    ``a``, ``b``: (n,) or (n, A) per identity (an (n, A) table gives one interval per column). The identities are
    resampled with replacement ``n_boot`` times, the *same* resample for both methods (paired), so what varies
    between heads (some are harder for every method) cancels. -> ``{"mean", "ci95": [lo, hi]}`` (lists per column
    for tables).
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim not in (1, 2) or len(a) < 2:
        raise ValueError(f"paired_bootstrap needs two equal (n,) or (n, A) arrays with n >= 2, got {a.shape}, "
                         f"{b.shape}")
    d = a - b
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), size=(n_boot, len(d)))
    boots = d[idx].mean(axis=1)                                   # (n_boot,) or (n_boot, A)
    lo, hi = np.percentile(boots, [50 * (1 - level), 100 - 50 * (1 - level)], axis=0)
    if d.ndim == 1:
        return {"mean": float(d.mean()), "ci95": [float(lo), float(hi)]}
    return {"mean": d.mean(axis=0).tolist(), "ci95": [lo.tolist(), hi.tolist()]}


def compare(model: dict, other: dict, metrics_: Iterable[str] = METRICS, seed: int = 0) -> dict:
    """Full model minus ``other`` per metric, with paired bootstrap intervals over identities (same identities in
    the same order). ``beats``: the interval excludes 0 on the full model's side (lower L2/LPIPS/normal error,
    higher SSIM/identity similarity); ``None`` where a figure is missing.
    -> ``{metric: {"mean", "ci95", "beats", "per_angle": {"mean": [..], "ci95": [[lo..], [hi..]]}}}``."""
    out = {}
    for m in metrics_:
        ta, tb = (model.get("table") or {}).get(m), (other.get("table") or {}).get(m)
        if ta is None or tb is None or np.shape(ta) != np.shape(tb) or len(ta) < 2:
            out[m] = None
            continue
        ta, tb = np.asarray(ta), np.asarray(tb)
        r = paired_bootstrap(ta.mean(1), tb.mean(1), seed=seed)
        lo, hi = r["ci95"]
        r["beats"] = None if LOWER_IS_BETTER[m] is None else bool(hi < 0) if LOWER_IS_BETTER[m] else bool(lo > 0)
        r["per_angle"] = paired_bootstrap(ta, tb, seed=seed)
        out[m] = r
    return out


def comparisons(results: dict, seed: int = 0) -> dict:
    """``compare`` of the full model with every baseline, and of the full model (``ablation_reference``: the one
    with the ablations' budget or on their heads, where present) with every ablation: ``{"baselines": {name:
    {...}}, "ablations": {name: {...}}}``."""
    model = results.get("model") or {}
    abl = results.get("ablations") or {}
    _, ref = ablation_reference(results)
    return {"baselines": {n: compare(model, r, seed=seed) for n, r in (results.get("baselines") or {}).items()},
            "ablations": {n: compare(ref, r, seed=seed) for n, r in abl.items() if n not in REFERENCE_ROWS}}


def ordering_report(results: dict, metrics_: tuple = ("l2", "ssim")) -> dict:
    """Does the full model beat every baseline and every ablation on ``metrics_``?

    "Beats" is statistical where the per-identity tables are there: the 95 % paired bootstrap interval of the
    difference (``comparisons``) excludes 0 on the full model's side; otherwise the means are compared.
    Baselines are compared with the run's model; ablations with ``ablation_reference``: ``full_same_budget``
    (the full model trained with the ablations' budget) or ``full_same_heads`` (the run's model on the heads the
    ablations ran on) when present, else the run's model.
    -> ``{"baselines": {name: {metric: bool or None}}, "ablations": {...}, "all_ok": bool, "baselines_ok": bool,
    "ablations_ok": bool, "note": one sentence per group, "stats": comparisons(results)}``.
    """
    stats = comparisons(results)
    model = results.get("model") or {}
    rep: dict = {"baselines": {}, "ablations": {}}
    fails: dict = {"baselines": [], "ablations": []}
    means_only: dict = {"baselines": False, "ablations": False}
    ref_name, ab_ref = ablation_reference(results)
    who = {"baselines": "the full model",
           "ablations": {"full_same_budget": "the full model (ablation budget)",
                         "full_same_heads": f"the full model (on the ablations' {ab_ref.get('n_identities')} heads)"
                         }.get(ref_name, "the full model")}
    for group, ref in (("baselines", model), ("ablations", ab_ref)):
        for name, row in (results.get(group) or {}).items():
            if name in REFERENCE_ROWS:
                continue
            rep[group][name] = {}
            for m in metrics_:
                a, b = (ref or {}).get(m), (row or {}).get(m)
                if a is None or b is None:
                    rep[group][name][m] = None
                    continue
                st = (stats.get(group, {}).get(name) or {}).get(m)
                if st is not None:
                    better = st["beats"]
                    why = f"{a:.4f} vs {b:.4f}, difference {st['mean']:+.4f}, 95% CI [{st['ci95'][0]:+.4f}, " \
                          f"{st['ci95'][1]:+.4f}]"
                else:
                    better = a < b if LOWER_IS_BETTER[m] else a > b
                    why = f"{a:.4f} vs {b:.4f}, no interval (fewer than 2 identities)"
                    means_only[group] = True
                rep[group][name][m] = bool(better)
                if not better:
                    fails[group].append(f"{who[group]} does not beat {group[:-1]} '{name}' on {m} ({why})")
    rep["all_ok"] = not (fails["baselines"] or fails["ablations"])
    on = " and ".join(metrics_)
    sentences = []
    for group in ("baselines", "ablations"):
        rep[f"{group}_ok"] = not fails[group]
        if not rep[group]:
            continue
        how = (" (means; no intervals with fewer than 2 identities)" if means_only[group] else
               " (95% paired bootstrap intervals over identities exclude 0)")
        text = "; ".join(fails[group]) if fails[group] else f"{who[group]} beats every {group[:-1]} on {on}{how}"
        sentences.append(text[0].upper() + text[1:] + ".")
    rep["note"] = " ".join(sentences) if sentences else "Nothing to compare."
    rep["stats"] = stats
    return rep
