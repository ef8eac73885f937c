"""Fewer steps (notebook 12): samplers against the profile's Euler spin on the protocol's heads, with paired
bootstrap intervals.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from .eval_methods import FULL, model_method
from .eval_protocol import EvalCase, heldout_cases, protocol_info
from .eval_scoring import evaluate_method, evaluation_encoders
from .eval_stats import compare
from .runs import Run

SAMPLER_METRICS = ("l2", "ssim", "id_sim_eval", "normal_angle_err_deg")


def evaluate_samplers(run: Run, configs: Iterable[tuple[str, int | None]], n_identities: int | None = None,
                      n_angles: int | None = None, reference: tuple[str, int | None] = ("euler", None),
                      parts=None, cases: list[EvalCase] | None = None, encoders: dict | None = None,
                      seed: int | None = None, progress: bool = True, previous: dict | None = None) -> dict:
    """Every ``(sampler, steps)`` of ``configs`` on the same held-out heads and seeds (the protocol of
    ``evaluate_all``), each against ``reference`` (the profile's Euler spin) with 95 % paired bootstrap intervals.

    -> ``{"protocol", "rows": {name: {sampler, steps, network_calls, view_evaluations (per spin of the protocol's
    views, mean over heads), seconds (per head), l2, ssim, id_sim_eval, normal_angle_err_deg, minus_reference:
    {metric: {"mean", "ci95"}}}}, "reference": name}``. A sampler that cannot run (no student) gets a row with
    its reason. ``tables`` holds every row's identity x angle tables of those metrics, so that ``previous`` (an
    earlier result of the same protocol, heads and seed) can be extended: its rows are kept and not sampled again.
    """
    from .spinning import SamplerError, SpinParts

    cases = cases or heldout_cases(run, n_identities, n_angles, progress=progress)
    parts = parts or SpinParts.from_run(run, progress=progress)
    encoders = encoders or evaluation_encoders(run, parts.encoder, progress)
    encoders = dict(encoders, faces=None)                        # face_found: not a figure of this comparison
    seed = run.seed if seed is None else seed
    label = lambda c: f"{c[0]}{c[1] or parts.profile.sample_steps}" if c[0] != "student" else \
        f"student{c[1] or ''}"
    rows, results = {}, {}
    if previous:
        protocol = protocol_info(run, cases)
        for k in ("identities", "n_angles"):
            if previous["protocol"].get(k) != protocol[k]:
                raise ValueError(f"the previous result measured other {k} ({previous['protocol'].get(k)}) than "
                                 f"these ({protocol[k]}): it cannot be extended")
        if previous.get("seed", seed) != seed:
            raise ValueError(f"the previous result used seed {previous.get('seed')}, not {seed}")
        rows.update(previous["rows"])
        results.update({n: {"table": t} for n, t in previous.get("tables", {}).items()})
    todo = [c for c in configs if reference is None or tuple(c) != tuple(reference)]
    for cfg in ([] if reference is None else [reference]) + todo:
        name = label(cfg)
        if name in results:
            continue
        work: list = []
        try:
            res = evaluate_method(cases, model_method(parts, FULL, seed, cfg[1], sampler=cfg[0], work=work),
                                  encoders, name, parts.source, progress=progress, keep_views=0)
        except SamplerError as e:
            rows[name] = {"sampler": cfg[0], "steps": cfg[1], "unavailable": str(e)}
            continue
        results[name] = res
        rows[name] = {"sampler": cfg[0], "steps": _steps_of(parts, cfg), "sigmas": _sigmas_of(parts, cfg),
                      "network_calls": float(np.mean([w["network"]["total"]["calls"] for w in work])),
                      "view_evaluations": float(np.mean([w["network"]["total"]["view_evaluations"] for w in work])),
                      "seconds": float(np.mean([w["seconds"] for w in work])),
                      **{m: res[m] for m in SAMPLER_METRICS}}
    tables = {n: {m: r["table"][m] for m in SAMPLER_METRICS if m in r.get("table", {})} for n, r in results.items()}
    out = {"protocol": protocol_info(run, cases), "reference": None if reference is None else label(reference),
           "seed": seed, "rows": rows, "tables": tables}
    return out if reference is None else against_reference(out, label(reference))


def against_reference(result: dict, reference: str) -> dict:
    """Add ``minus_reference`` (95 % paired bootstrap over heads), ``view_evaluation_ratio`` and ``seconds_ratio``
    to every row of an ``evaluate_samplers`` result against its row ``reference``."""
    tables, rows = result["tables"], result["rows"]
    if reference not in tables:
        raise ValueError(f"no row {reference!r} with tables to compare against; rows: {sorted(tables)}")
    ref = {"table": tables[reference]}
    for name in tables:
        if name == reference:
            continue
        diff = compare({"table": tables[name]}, ref, SAMPLER_METRICS, seed=0)
        rows[name]["minus_reference"] = {m: ({"mean": d["mean"], "ci95": d["ci95"]} if d else None)
                                         for m, d in diff.items()}
        rows[name]["view_evaluation_ratio"] = rows[name]["view_evaluations"] / rows[reference]["view_evaluations"]
        rows[name]["seconds_ratio"] = rows[name]["seconds"] / rows[reference]["seconds"]
    return dict(result, reference=reference)


def merge_sampler_results(parts: list[dict], reference: str) -> dict:
    """Several ``evaluate_samplers`` results of the same protocol, heads and seed (e.g. one process per sampler)
    as one, compared with the row ``reference``."""
    first = parts[0]
    for p in parts[1:]:
        for k in ("identities", "n_angles"):
            if p["protocol"].get(k) != first["protocol"].get(k):
                raise ValueError(f"cannot merge results of other {k}: {p['protocol'].get(k)} vs "
                                 f"{first['protocol'].get(k)}")
        if p.get("seed") != first.get("seed"):
            raise ValueError("cannot merge results of different seeds")
    merged = dict(first, rows={}, tables={})
    for p in parts:
        merged["rows"].update(p["rows"])
        merged["tables"].update(p["tables"])
    return against_reference(merged, reference)


def _steps_of(parts, cfg) -> int:
    from .spinning import plan_sampler
    return plan_sampler(parts, cfg[0], cfg[1]).steps


def _sigmas_of(parts, cfg) -> list[float]:
    from .spinning import plan_sampler
    return [round(float(x), 6) for x in plan_sampler(parts, cfg[0], cfg[1]).sigmas]
