"""The whole evaluation at once: the paper's protocol, its baselines and its ablations on a run, written as a table
(``evaluate_all``, ``write_results``, ``python -m spinmeround_lite.evaluate``; METHOD.md section 7, notebook 09).

Its parts, one idea each, and every name of them importable from here: ``eval_protocol`` (held-out cases, true
views), ``eval_scoring`` (metrics per identity and angle), ``eval_methods`` (baselines, the model and its
variants), ``eval_ablations`` (the ablation models), ``eval_stats`` (paired bootstrap, ordering), ``eval_report``
(tables, plots), ``eval_samplers`` (fewer steps, notebook 12).

Protocol (SpinMeRound, section 4 of the paper, on NeRSemble; here on held-out procedural heads):

1. Held-out identities only: ``heldout_cases`` refuses any identity of the dataset's train split or of a
   training manifest found in the run folder (``LeakageError``).
2. One input view: the frontal render (yaw 0, pitch 0).
3. ``eval_angles`` target angles evenly around the head (16 in the paper), yaw ``i * 360 / A``, pitch 0,
   rendered as ground truth from the identity's parameters (``render.render_views``); an identity without
   parameters (external renders) uses its nearest dataset views instead.
4. A method turns a case into generated views ``rgb (A,3,H,W)`` (+ ``normal (A,3,H,W)`` unit vectors, or
   None); ``evaluate_method`` compares them with the truth, per angle and overall: L2 (MSE on [0,1]), SSIM,
   LPIPS (or null with the reason), identity similarity to the true view with the conditioning encoder
   (stands in for ArcFace) and with the independent evaluation encoder (stands in for VGGFace), and the
   normal-map angular error inside the true silhouette.

Baselines: ``copy_input`` (the input view at every angle; normals: a flat surface facing the camera),
``mean_head`` (the average training head image at each angle), ``no_3d_attention`` (the trained model with its
3D self-attention switched to per-view 2D attention: same weights). Ablations (``ABLATIONS``): the model trained
without the input image, without the identity embedding, or without normal generation.
"""

from __future__ import annotations

import os
from pathlib import Path

from .eval_ablations import (  # noqa: F401 (every name of the evaluation, importable from here)
    ABLATIONS,
    AblationUnavailable,
    ablation_steps,
    check_ablation_config,
    describe_source,
    ensure_ablation,
    trained_steps,
    trainer_options_missing,
)
from .eval_methods import (  # noqa: F401
    ABLATION_VARIANTS,
    FULL,
    Variant,
    _chunks_around,
    attention_2d,
    copy_input_method,
    facing_normals,
    generate_case,
    mean_head_method,
    mean_training_head,
    model_method,
    round_trip_method,
)
from .eval_protocol import (  # noqa: F401
    EvalCase,
    LeakageError,
    _identity_params,
    assert_heldout,
    eval_yaws,
    heldout_cases,
    protocol_info,
    render_truth,
    training_identities,
    truth_method,
)
from .eval_report import (  # noqa: F401
    ABLATION_LABELS,
    BASELINE_LABELS,
    METRIC_LABELS,
    PAPER_ABLATION_NOTE,
    PAPER_TABLE,
    _fmt,
    differences_table,
    plot_per_angle,
    results_table,
)
from .eval_samplers import (  # noqa: F401
    SAMPLER_METRICS,
    against_reference,
    evaluate_samplers,
    merge_sampler_results,
)
from .eval_scoring import (  # noqa: F401
    FACE_DETECTOR_MISSING,
    LOWER_IS_BETTER,
    METRICS,
    Method,
    evaluate_method,
    evaluation_encoders,
    restrict_row,
    score_views,
    strip_views,
    unavailable,
)
from .eval_stats import (  # noqa: F401
    BOOTSTRAP,
    REFERENCE_ROWS,
    ablation_reference,
    compare,
    comparisons,
    ordering_report,
    paired_bootstrap,
)
from .runs import Run


# ----------------------------------------------------------------------------------------------
# everything at once (notebook 09 walks through the same steps one by one)
# ----------------------------------------------------------------------------------------------
def evaluate_all(run: Run, n_identities: int | None = None, n_angles: int | None = None,
                 baselines: bool = True, ablations: bool = True, mean_head_identities: int = 16,
                 lpips_path: str | os.PathLike | None = None, progress: bool = True) -> dict:
    """The whole protocol on ``run``: the model, the three baselines and the three ablations.

    Returns ``{"protocol": {...}, "truth": {...}, "model": {...}, "baselines": {name: {...}}, "ablations":
    {name: {...}}, "ordering": ordering_report(...)}``; each entry as ``evaluate_method`` returns it (with its views);
    ``truth`` scores the true views themselves (``truth_method``: the face-found rate to read the others against),
    ``autoencoder`` the true views through the autoencoder (``round_trip_method``: the latent models' ceiling).
    """
    from .spinning import SpinParts

    cases = heldout_cases(run, n_identities, n_angles, progress=progress)
    parts = SpinParts.from_run(run, progress=progress)
    encoders = evaluation_encoders(run, parts.encoder, progress)
    kw = dict(lpips_path=lpips_path, progress=progress)
    source = describe_source(parts.source, parts.model)
    results: dict = {"protocol": protocol_info(run, cases), "baselines": {}, "ablations": {}}
    results["truth"] = evaluate_method(cases, truth_method, encoders, "true views", "rendered truth", **kw)
    results["autoencoder"] = evaluate_method(cases, round_trip_method(parts.codec), encoders,
                                             "true views through the autoencoder", "encoded and decoded", **kw)
    results["model"] = evaluate_method(cases, model_method(parts, FULL, run.seed), encoders, "full model", source, **kw)
    if baselines:
        results["baselines"]["copy_input"] = evaluate_method(cases, copy_input_method, encoders, "copy input",
                                                             "no training", **kw)
        mh = mean_training_head(run, cases[0].yaw, cases[0].pitch, mean_head_identities, progress=progress)
        results["baselines"]["mean_head"] = evaluate_method(cases, mean_head_method(mh), encoders, "mean head",
                                                            f"mean of {mh['n']} training heads", **kw)
        with attention_2d(parts.model):
            results["baselines"]["no_3d_attention"] = evaluate_method(
                cases, model_method(parts, FULL, run.seed), encoders, "no 3D attention",
                f"same weights ({source}), 2D attention", **kw)
    if ablations:
        results["ablations"] = evaluate_ablations(run, cases, parts, encoders, **kw)
    results["ordering"] = ordering_report(results)
    return results


def evaluate_ablations(run: Run, cases: list[EvalCase], parts, encoders: dict, lpips_path=None,
                       progress: bool = True, n_identities: int | None = None, model_row: dict | None = None) -> dict:
    """Each ablation of ``ABLATION_VARIANTS`` (trained with ``profile.ablation_steps`` or from reference
    checkpoints), plus ``full_same_budget`` (the full model with the ablations' budget) when the run's model was
    trained with another budget, so the ablation table compares like with like.

    ``n_identities``: evaluate the ablations on the first that many of ``cases`` only (default all; notebook 09 at
    ``cpu`` takes 2 of its 4 to hold the course's time). The full model they are compared with is then
    ``full_same_heads``: ``model_row`` (the run's model on all ``cases``) cut to the same heads (``restrict_row``,
    nothing sampled again), or sampled on them when no ``model_row`` is given."""
    from .spinning import SpinParts

    n_all = len(cases)
    cases = cases[:n_identities] if n_identities else cases
    out: dict = {}
    budgets = set()
    main_steps = trained_steps(parts.model)

    def one(name: str, variant: Variant) -> None:
        try:
            model, source = ensure_ablation(run, name, progress=progress)
        except AblationUnavailable as e:
            out[name] = unavailable(str(e))
            return
        budgets.add(trained_steps(model))
        ab_parts = SpinParts(model.eval(), parts.codec, parts.encoder, parts.profile, source)
        out[name] = evaluate_method(cases, model_method(ab_parts, variant, run.seed), encoders, name,
                                    describe_source(source, model), lpips_path=lpips_path, progress=progress)

    for name, variant in ABLATION_VARIANTS.items():
        one(name, variant)
    if main_steps is None or budgets - {main_steps} or (not budgets and main_steps != ablation_steps(run)):
        one("full_same_budget", FULL)
        out = {"full_same_budget": out.pop("full_same_budget"), **out}
    elif len(cases) < n_all:
        if model_row is not None:
            same = restrict_row(model_row, len(cases))
        else:
            same = evaluate_method(cases, model_method(parts, FULL, run.seed), encoders, "full model",
                                   describe_source(parts.source, parts.model), lpips_path=lpips_path,
                                   progress=progress)
        out = {"full_same_heads": same, **out}
    return out


def write_results(run: Run, results: dict, note: str = "") -> dict:
    """Write ``results_table.md`` and ``results.json`` (no views) to the run folder; return their paths."""
    from .runs import atomic_path, write_json

    if not note:
        model = results.get("model") or {}
        ordering = results.get("ordering", {})
        note = ordering.get("note", "")
        protocol = results.get("protocol", {})
        heads = f"{protocol.get('n_identities', '?')} identities x {protocol.get('n_angles', '?')} angles"
        if note and not ordering.get("baselines_ok", True):
            note += (f" The model here: {model.get('source', '?')} at the `{run.profile.name}` profile, {heads}; "
                     "a model trained this little (or measured on this few heads) is not expected to beat the "
                     "baselines.")
        if note and not ordering.get("ablations_ok", True):
            same = ablation_reference(results)[1]
            ab_heads = f"{same.get('n_identities', '?')} identities x {protocol.get('n_angles', '?')} angles"
            note += (f" The ablations and the full model they are compared with: {same.get('source', '?')} each, "
                     f"{ab_heads}; the ordering is measured at this budget only (the paper's models start from large "
                     "pretrained networks).")
    table = results_table(results, run.profile.name, note)
    md = run.path("results_table.md")
    with atomic_path(md) as tmp:
        tmp.write_text(table)
    js = write_json(run.path("results.json"), strip_views(results))
    return {"table": md, "json": js}


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m spinmeround_lite.evaluate",
                                 description="Evaluate the run's model with the paper's protocol (notebook 09).")
    ap.add_argument("--profile", default="", help="test, cpu, gpu or paper (default: $SMR_PROFILE, else cpu)")
    ap.add_argument("--run-dir", default="", help="run folder (default: $SMR_RUN_DIR, else runs/<profile>)")
    ap.add_argument("--identities", type=int, default=None, help="held-out identities (default: the profile's)")
    ap.add_argument("--angles", type=int, default=None, help="target angles (default: the profile's, 16 in the paper)")
    ap.add_argument("--no-ablations", action="store_true", help="skip the ablations (they train models)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--out", default="", help="also write evaluation.json and results_table.md here "
                                              "(e.g. results/cpu, the committed evaluation the README quotes)")
    a = ap.parse_args(argv)
    run = Run.open(a.profile, a.run_dir, notebook="09_evaluation_cli", seed=a.seed)
    res = evaluate_all(run, a.identities, a.angles, ablations=not a.no_ablations)
    paths = write_results(run, res)
    print(paths["table"].read_text())
    print(f"written: {paths['table']} and {paths['json']}")
    if a.out:
        import shutil
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        from .runs import atomic_path
        for src, name in ((paths["json"], "evaluation.json"), (paths["table"], "results_table.md")):
            with atomic_path(out / name) as tmp:
                shutil.copyfile(src, tmp)
        print(f"and copied to {out / 'evaluation.json'}, {out / 'results_table.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
