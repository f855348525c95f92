"""Check that the figures quoted in README.md and docs/ are the ones their JSON files in benchmarks/results/ hold.

Each check names a document, a line of it (found by an anchor text), a JSON file and the values it quotes: every
value is formatted as the document prints it and must appear in that line as a whole number (not inside a longer
one), and the JSON file must be named in that line or earlier in the same section (a table names it once, in its
heading, its first column or the sentence above it). A second check: every `*.json` of benchmarks/results/ that a
document names exists. A re-run benchmark or an edited figure that no longer agree fail here.

Usage: python tools/check_doc_numbers.py [--root REPO]     (exit 1 and one line per mismatch)
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path("benchmarks") / "results"
DOCS = ("README.md", "docs/data.md", "docs/eval.md", "docs/kernels.md", "docs/model.md", "docs/training.md",
        "docs/cluster.md", "docs/benchmarks.md", "docs/quotient.md")


@dataclass(frozen=True)
class Check:
    doc: str  # path relative to the repository root
    anchor: str  # text that picks the one line holding the figures ("re:" + a regular expression)
    json: str  # file name in benchmarks/results/
    values: tuple[tuple[Callable[[Any], float], str], ...]  # (value from the loaded JSON, format as printed)


def pct(x: float) -> float:
    return 100.0 * x


def _lc(i: int, key: str) -> Callable[[Any], float]:
    return lambda d: d["evals"][i][key]


def _lc_loss(i: int) -> Callable[[Any], float]:
    """The logged training loss at the evaluation's step (the nearest logged step)."""
    return lambda d: min(d["loss_curve"], key=lambda r: abs(r["step"] - d["evals"][i]["step"]))["loss"]


def _loss_at(step: int) -> Callable[[Any], float]:
    return lambda d: min(d["loss_curve"], key=lambda r: abs(r["step"] - step))["loss"]


_ROOT = [REPO]  # the tree being checked (check_all sets it), for checks that read a second JSON


def _load(name: str) -> Any:
    return json.loads((_ROOT[0] / RESULTS / name).read_text(encoding="utf-8"))


def _pd(t0: int, key: str) -> Callable[[Any], float]:
    return lambda d: pct(next(r for r in d["rows"] if r["t0"] == t0)[key])


# bench_memorise.py: the score, the sample metrics, and the training budget used
MEMORISE = (
    (lambda d: pct(d["stable_and_in_training_set"]), "{:.1f}%"), (lambda d: pct(d["atom_stability"]), "{:.1f}%"),
    (lambda d: pct(d["mol_stability"]), "{:.1f}%"), (lambda d: pct(d["validity"]), "{:.1f}%"),
    (lambda d: d["train_cpu_min"], "{:.1f} CPU minutes"), (lambda d: d["steps"], "{:,} steps"))


def _sbs(config: str, *keys: str) -> Callable[[Any], float]:
    def get(d: Any) -> float:
        v = d["configs"][config]["summary"]
        for k in keys:
            v = v[k]
        return v
    return get


def _scale(w: int, key: str, before: bool = False, div: float = 1.0) -> Callable[[Any], float]:
    """bench_scale: the median row of world size ``w`` (``before``: the previous loader's, same run)."""
    def get(d: Any) -> float:
        rows = d["baseline"]["ranks"] if before else d["ranks"]
        return next(r for r in rows if r["world_size"] == w)[key] / div
    return get


def _scale_ratio(w: int, before: bool = False) -> Callable[[Any], float]:
    """Bytes a rank reads per epoch times W, over the bytes of W = 1: 1.0 when they fall as 1/W."""
    return lambda d: _scale(w, "bytes_read_per_epoch", before)(d) * w / _scale(1, "bytes_read_per_epoch", before)(d)


def _build(i: int) -> Callable[[Any], float]:
    return lambda d: d["results"][i]["seconds_best"]


def _loader(key: str, pick: Callable[[list], float], budget: bool | None = None) -> Callable[[Any], float]:
    """QM9, one process; budget True / False: token-budget / fixed-size batches only."""
    def keep(r: dict) -> bool:
        return (r["data"] == "QM9 train" and "world_size" not in r
                and (budget is None or ("max_atoms_per_batch" in r) == budget))
    return lambda d: pick([r[key] for r in d["results"] if keep(r)])


def _bgs(full: bool, ranks: int, key: str) -> Callable[[Any], float]:
    """build_geom_scale.json: one case, by source (the full file or the 1 GB prefix) and rank count."""
    return lambda d: next(c[key] for c in d["cases"] if c["ranks"] == ranks and (c["source_gb"] > 5) == full)


def _train(config: str, nproc: int, key: str) -> Callable[[Any], float]:
    return lambda d: next(r[key] for r in d["results"] if r["config"] == config and r["nproc"] == nproc)


def _kernel(kernel: str, shape: str, mode: str, variant: str, key: str) -> Callable[[Any], float]:
    return lambda d: next(r for r in d["results"] if (r["kernel"], r["shape"], r["mode"]) == (kernel, shape, mode)
                          )["variants"][variant][key]


def _regs(kernel: str) -> Callable[[Any], float]:
    return lambda d: next(r["registers"] for r in d if r["kernel"] == kernel)


def _gemm(threads: int, key: str, pick: Callable[[list], float]) -> Callable[[Any], float]:
    return lambda d: pick([r[key] for r in d["rows"] if r["threads"] == threads])


def _lc_checks(doc: str) -> list[Check]:
    """The 2-hour learning-curve table of docs/model.md: one row per (kind, evaluation)."""
    out = []
    for kind in ("symdiff", "dit", "dit_aug", "symdiff_haar"):
        for i, minutes in ((0, 60), (1, 120)):
            row = rf"re:^\| {kind} \| [\d,]+ \| {minutes} \|"  # kind, any step count, minutes
            out.append(Check(doc, row, f"learning_curve_qm9_tiny_{kind}_2h.json", (
                (_lc(i, "step"), "{:,.0f}"), (_lc_loss(i), "{:.3f}"),
                (lambda d, i=i: pct(d["evals"][i]["atom_stability"]), "{:.1f}%"),
                (lambda d, i=i: pct(d["evals"][i]["mol_stability"]), "{:.1f}%"),
                (lambda d, i=i: pct(d["evals"][i]["validity"]), "{:.1f}%"),
                (lambda d, i=i: pct(d["evals"][i]["uniqueness"]), "{:.1f}%"))))
    return out


QUOTIENT = "quotient_cpu_2026-12-01.json"


def _q_row(part: str, t: int, field: str, key: str) -> Callable[[Any], float]:
    return lambda d: next(r for r in d["variance"][part]["rows"] if r["t_int"] == t)[field][key]


def _q_train(config: str, target: str, key: str) -> Callable[[Any], float]:
    return lambda d: next(r for r in d["train_steps"] if r["config"] == config and r["target"] == target)[key]


def _quotient_checks(doc: str) -> list[Check]:
    """docs/quotient.md: the variance-against-t tables and the cost table of bench_quotient.py."""
    out = []
    for t in (1, 10, 50, 100, 250, 500, 750, 1000):
        out.append(Check(doc, rf"re:^\| t = {t} \|", QUOTIENT, tuple(
            (_q_row("qm9_test_molecules", t, "ratio_to_standard", k), "{:.3f}")
            for k in ("mcmc_64", "mcmc_256", "hungarian"))))
    for t in (250, 500, 750):
        out.append(Check(doc, rf"re:^\| small, t = {t} \|", QUOTIENT, (
            (_q_row("qm9_small_molecules", t, "ratio_to_standard", "exact"), "{:.3f}"),
            *((_q_row("qm9_small_molecules", t, "error_vs_exact_per_component", k), "{:.4f}")
              for k in ("standard", "mcmc_64", "mcmc_256", "hungarian")))))
    for config in ("qm9_tiny", "geom_symdiff_s"):
        for target in ("standard", "mcmc_64", "hungarian"):
            share = () if target == "standard" else (
                (lambda d, c=config, t=target: pct(_q_train(c, t, "estimator_share")(d)), "{:.0f}%"),)
            out.append(Check(doc, f"| {config}, {target} |", QUOTIENT, (
                (_q_train(config, target, "median_step_s"), "{:.3f}"), *share,
                *((lambda d, c=config, t=target, i=i: _q_train(c, t, "per_run_median_step_s")(d)[i], "{:.3f}")
                  for i in range(3)))))
    for case, label in (("qm9_batch", "| QM9 test batch of 64 |"), ("n181", "| N = 181, batch 16 |")):
        out.append(Check(doc, label, QUOTIENT, tuple(
            (lambda d, c=case, k=k: d["estimator_seconds_in_process"][c]["seconds"][k], "{:.3f}")
            for k in ("mcmc_64", "mcmc_256", "hungarian"))))
    return out


QUOTIENT_TRAIN = "quotient_train_qm9_2026-12-01.json"
# docs/training.md's screen (bench_recipe.py): (row label, file, variant, seed)
RECIPE_ROWS = (
    ("`baseline`, seed 0", "recipe_screen_qm9_tiny_2026-12-01.json", "baseline", 0),
    ("`baseline`, seed 1", "recipe_screen_qm9_tiny_seed1_2026-12-01.json", "baseline", 1),
    ("`baseline`, seed 2", "recipe_screen_qm9_tiny_lr4_2026-12-02.json", "baseline", 2),
    ("`lr_2x`, seed 0", "recipe_screen_qm9_tiny_extra_2026-12-01.json", "lr_2x", 0),
    ("`lr_2x`, seed 1", "recipe_screen_qm9_tiny_lr_2026-12-02.json", "lr_2x", 1),
    ("`lr_2x`, seed 2", "recipe_screen_qm9_tiny_lr_2026-12-02.json", "lr_2x", 2),
    ("`lr_4x`, seed 0", "recipe_screen_qm9_tiny_lr4_seed0_2026-12-02.json", "lr_4x", 0),
    ("`lr_4x`, seed 1", "recipe_screen_qm9_tiny_lr4_seed1_2026-12-02.json", "lr_4x", 1),
    ("`lr_4x`, seed 2", "recipe_screen_qm9_tiny_lr4_2026-12-02.json", "lr_4x", 2),
    ("`snr_clamped`, seed 0", "recipe_screen_qm9_tiny_2026-12-01.json", "snr_clamped", 0),
    ("`snr_clamped`, seed 1", "recipe_screen_qm9_tiny_seed1_2026-12-01.json", "snr_clamped", 1),
    ("`low_noise`, seed 0", "recipe_screen_qm9_tiny_2026-12-01.json", "low_noise", 0),
    ("`low_noise`, seed 1", "recipe_screen_qm9_tiny_seed1_2026-12-01.json", "low_noise", 1),
    ("`t_int`, seed 0", "recipe_screen_qm9_tiny_2026-12-01.json", "t_int", 0),
    ("`adamw`, seed 0", "recipe_screen_qm9_tiny_2026-12-01.json", "adamw", 0),
    ("`cosine`, seed 0", "recipe_screen_qm9_tiny_2026-12-01.json", "cosine", 0),
    ("`snr_clamped_low_noise`, seed 0", "recipe_screen_qm9_tiny_extra_2026-12-01.json", "snr_clamped_low_noise", 0),
)
QUALITY = "quality_qm9_tiny_2026-12-01.json"
PAPER_QUALITY = "paper_quality_table1.json"
PAPER_NAMES = {"dit": "DiT", "dit_aug": "DiT-Aug", "symdiff_haar": "SymDiff-H", "symdiff": "SymDiff", "egnn": "EDM"}


def _quality_checks(doc: str) -> list[Check]:
    """docs/benchmarks.md: the ablation over kinds and seeds (bench_quality.py) and the paper's Table 1 beside it."""
    wall = lambda v: lambda d: statistics.median(r["train_wall_s"] for r in d["runs"] if r["kind"] == v)  # noqa: E731
    out = [_summary_row(doc, f"`{v}`", QUALITY, v, extra=((wall(v), "{:.0f}"),)) for v in PAPER_NAMES]
    for name in PAPER_NAMES.values():
        out.append(Check(doc, f"| {name} (paper) |", PAPER_QUALITY, tuple(
            (lambda d, n=name, m=m, st=st: d["qm9_table1"][n][m][st], "{:.2f}")
            for m in ("nll", "atom_stability_pct", "mol_stability_pct", "validity_pct", "uniqueness_pct")
            for st in ("mean", "std"))))
    atom = lambda pick: lambda d: pick(pct(d["summary"][v]["atom_stability"]["mean"])  # noqa: E731
                                       for v in ("dit", "dit_aug", "symdiff_haar", "symdiff"))
    out.append(Check(doc, "Their atom stabilities (", QUALITY, ((atom(min), "({:.1f}"), (atom(max), "{:.1f}%)"))))
    def nll_std(pick: Callable) -> Callable[[Any], float]:
        return lambda d: pick(d["summary"][v]["nll"]["std"] for v in ("dit", "dit_aug", "symdiff"))
    out.append(Check(doc, "has a seed std of", QUALITY, ((nll_std(min), "{:.0f}"), (nll_std(max), "{:.0f} nats"))))
    out.append(Check(doc, "reconstruction terms at low noise). `symdiff_haar`", QUALITY, (
        (lambda d: d["summary"]["symdiff_haar"]["nll"]["mean"], "({:.2f})"),)))
    return out


def _quotient_train_checks(doc: str) -> list[Check]:
    """docs/quotient.md: the same network trained on each target (bench_quality.py, one seed)."""
    out = [_summary_row(doc, label, QUOTIENT_TRAIN, v, stds=False, extra=(
        (_run_of(v, "train_wall_s"), "{:.0f}"), (_mean_loss(v, 600), "{:.4f}")))
        for label, v in (("`standard`", "symdiff"), ("`mcmc_64` (64 steps)", "mcmc_64"),
                         ("`mcmc_256` (256 steps)", "mcmc_256"), ("`hungarian`", "hungarian"))]
    drop = lambda v: lambda d: pct(1 - _mean_loss(v, 600)(d) / _mean_loss("symdiff", 600)(d))  # noqa: E731
    out.append(Check(doc, "by 13% with the 64-step chain", QUOTIENT_TRAIN, (
        (drop("mcmc_64"), "{:.0f}%"), (drop("mcmc_256"), "{:.0f}%"), (drop("hungarian"), "{:.0f}%"))))
    val = lambda v: lambda d: pct(d["summary"][v]["validity"]["mean"])  # noqa: E731
    out.append(Check(doc, "made valid molecules twice as often", QUOTIENT_TRAIN, (
        (val("hungarian"), "({:.1f}%"), (val("symdiff"), "{:.1f}%;"))))
    return out


def _pd_checks(doc: str) -> list[Check]:
    """The partial-denoising table of docs/model.md: one check per (t0, kind) cell."""
    out = []
    for t0 in (10, 50, 100, 200):
        for kind in ("symdiff", "dit", "dit_aug", "symdiff_haar"):
            out.append(Check(doc, rf"re:^\| {t0} \|", f"partial_denoise_qm9_tiny_{kind}_120min.json", (
                (_pd(t0, "atom_stability"), "{:.1f}%"), (_pd(t0, "mol_stability"), "{:.1f}%"))))
    return out


def _summary_row(doc: str, label: str, json_name: str, variant: str, stds: bool = True,
                 extra: tuple[tuple[Callable[[Any], float], str], ...] = ()) -> Check:
    """One row of a bench_quality table: NLL, then the four EDM metrics in %, each its mean over seeds (and the
    std over seeds with ``stds``), then any ``extra`` figures of the row."""
    def cell(metric: str, stat: str) -> tuple[Callable[[Any], float], str]:
        scale = 1.0 if metric == "nll" else 100.0
        return (lambda d: scale * d["summary"][variant][metric][stat], "{:.2f}" if metric == "nll" else "{:.1f}")
    return Check(doc, f"| {label} |", json_name, tuple(
        cell(m, stat) for m in ("nll", "atom_stability", "mol_stability", "validity", "uniqueness")
        for stat in (("mean", "std") if stds else ("mean",))) + extra)


def _run_of(variant: str, key: str, seed: int = 0) -> Callable[[Any], float]:
    return lambda d: next(r for r in d["runs"] if r["kind"] == variant and r["seed"] == seed)[key]


def _mean_loss(variant: str, after: int, seed: int = 0) -> Callable[[Any], float]:
    """The mean logged training loss after step ``after`` of one run."""
    return lambda d: statistics.fmean(loss for step, loss in _run_of(variant, "loss_curve", seed)(d) if step > after)


def _recipe_row(doc: str, label: str, json_name: str, variant: str, seed: int, t0s: tuple[int, ...] = (50, 100)
                ) -> Check:
    """One row of bench_recipe.py's screen, one run: its training loss, then the partial-denoise atom / molecule
    stability from each t0."""
    run = lambda d: next(r for r in d["runs"] if r["variant"] == variant and r["seed"] == seed)  # noqa: E731
    pd = lambda d, t0, m: pct(next(p for p in run(d)["partial_denoise"] if p["t0"] == t0)[m])  # noqa: E731
    return Check(doc, f"| {label} |", json_name, ((lambda d: run(d)["loss_last_fifth"], "{:.4f}"),) + tuple(
        (lambda d, t0=t0, m=m: pd(d, t0, m), "{:.1f}") for t0 in t0s for m in ("atom_stability", "mol_stability")))


STEPS = "steps_qm9_tiny.json"


def _cell(process: str, sampler: str, steps: int, key: str, scale: float = 1.0) -> Callable[[Any], float]:
    def get(d: Any) -> float:
        cell = next(c for c in d["cells"] if (c["process"], c["sampler"], c["steps"]) == (process, sampler, steps))
        return scale * cell[key]
    return get


def _path(*keys: Any, scale: float = 1.0) -> Callable[[Any], float]:
    def get(d: Any) -> float:
        for k in keys:
            d = d[k]
        return scale * d
    return get


def _steps_checks(doc: str) -> list[Check]:
    """The quality-against-steps table of docs/model.md: one row per (process, sampler, steps) cell of its JSON."""
    path = REPO / RESULTS / STEPS
    if not path.is_file():
        return [Check(doc, "| process | sampler | steps |", STEPS, ())]  # fails: the table's JSON is missing
    out = []
    for c in json.loads(path.read_text(encoding="utf-8"))["cells"]:
        at = (c["process"], c["sampler"], c["steps"])
        rates = [k for k in ("atom_stability", "atom_stability_se", "mol_stability", "validity", "uniqueness")
                 if c.get(k) is not None]
        out.append(Check(doc, rf"re:^\| {at[0]} \| {at[1]} \| {at[2]} \|", STEPS, (
            (_cell(*at, "n_samples"), "| {:.0f} |"), *[(_cell(*at, k, 100.0), "{:.1f}") for k in rates],
            (_cell(*at, "s_per_molecule"), "{:.3f}"))))
    for p in ("vdm", "vpsde", "flow"):  # the training table: one row per process
        out.append(Check(doc, rf"re:^\| {p} \| 1,000 \| 64 \|", STEPS, (
            (_path("train", p, "train_wall_s"), "{:.1f}"), (_path("train", p, "it_per_s_median"), "{:.2f}"),
            (_path("train", p, "loss_last_logged"), "{:.3f}"), (_path("train", p, "load_average_start", 0), "{:.1f}"))))
    vdm, flow = ("goals", "vdm_100_steps"), ("goals", "flow_heun_100_steps")
    out += [Check(doc, "Goal 1 (vdm at 100 steps)", STEPS, (
                (_path(*vdm, "atom_stability_100", scale=100.0), "{:.1f}%"),
                (_path(*vdm, "atom_stability_ancestral_1000", scale=100.0), "{:.1f}%"),
                (_path(*vdm, "points_lost"), "{:.1f} points"))),
            Check(doc, "Goal 2 (flow Heun at 100 steps)", STEPS, (
                (_path(*flow, "atom_stability_flow_heun_100", scale=100.0), "{:.1f}%"),
                (_path(*flow, "atom_stability_vdm_ancestral_1000", scale=100.0), "{:.1f}%"))),
            Check(doc, "the load average reached", STEPS, (
                (lambda d: max(c["load_average_end"][0] for c in d["cells"]), "{:.0f}"),))]
    return out


def _kernel_rows(doc: str) -> list[Check]:
    rows = [("gaussian", "qm9", "(256, 29)"), ("gaussian", "geom", "(6, 181)"), ("com", "qm9", "(256, 29)"),
            ("com", "geom", "(64, 181)"), ("com", "stream", "(179597, 29)"), ("qr", "qm9", "(256, -)"),
            ("qr", "geom", "(64, -)"), ("qr", "stream", "(179597, -)")]
    out = []
    for kernel, shape, dims in rows:
        for mode in ("fwd", "fwd+bwd"):
            out.append(Check(doc, f"| {kernel} | {shape} {dims} | {mode} |", "kernels_cpu_2026-11-25.json", (
                (_kernel(kernel, shape, mode, "eager", "median_ms"), "{:.4g}"),
                (_kernel(kernel, shape, mode, "compiled", "median_ms"), "{:.4g}"),
                (_kernel(kernel, shape, mode, "compiled", "speedup_vs_eager"), "{:.2f}x"),
                (_kernel(kernel, shape, mode, "eager", "peak_MB"), "{:.4g}"),
                (_kernel(kernel, shape, mode, "compiled", "peak_MB"), "{:.4g}"))))
    return out


def _sbs_row(doc: str, anchor: str, json_name: str, config: str, undisturbed: bool = False,
             shares: bool = False) -> Check:
    """A side-by-side figure: molecules/s of both sides and their ratio (over all timed steps, or undisturbed)."""
    keys = ("undisturbed_steps",) if undisturbed else ()
    values = [(_sbs(config, *keys, "project_molecules_per_s"), "{:.1f}"),
              (_sbs(config, *keys, "official_molecules_per_s"), "{:.1f}"),
              (_sbs(config, *keys, "ratio_project_over_official"), "{:.2f}x")]
    if shares:  # the range of the per-pass means of other processes' share of the machine, each side
        for side in ("official", "project"):
            for pick in (min, max):
                values.append((lambda d, side=side, pick=pick: pick(
                    r["mean_foreign_cpu"] for r in d["configs"][config][side]), "{:.2f}"))
    return Check(doc, anchor, json_name, tuple(values))


def _load_range(config: str, pick: Callable, *names: str) -> Callable[[Any], float]:
    """The 1-minute load average before/after every run of a config, over one or more side-by-side files."""
    return lambda d: pick(r[k][0] for n in names for side in ("official", "project")
                          for r in _load(n)["configs"][config][side]
                          for k in ("load_average_before", "load_average_after"))


def _speed_checks(doc: str) -> list[Check]:
    """The own-timing table of docs/model.md: two runs of bench_model_speed.py, one JSON each."""
    out = []
    for name in ("model_speed_2026-11-25_onednn.json", "model_speed_2026-11-25_onednn_run2.json"):
        for config, label in (("qm9_symdiff_s", "SymDiff+ "), ("qm9_symdiff_l", "SymDiff+++ ")):
            c = lambda d, config=config: d["configs"][config]
            out.append(Check(doc, f"| {label}training step, batch 64 |", name, (
                (lambda d, c=c: c(d)["train"]["s_per_step_median"], "{:.3f}"),
                (lambda d, c=c: c(d)["train"]["mol_per_s"], "{:.1f}"),
                (lambda d, c=c: c(d)["train_linear_aten"]["mol_per_s"], "{:.1f}"))))
            out.append(Check(doc, f"| {label}sampling, 1,000 steps, batch 100 (sorted", name, (
                (lambda d, c=c: c(d)["sample_sorted"]["s_per_molecule_1000_steps"], "{:.2f}"),)))
        out.append(Check(doc, "per-token layers run on real atoms only", name, (
            (lambda d: pct(d["configs"]["qm9_symdiff_s"]["train"]["padding_fraction_mean"]), "{:.0f}% padding"),)))
    both = ("model_speed_2026-11-25_onednn.json", "model_speed_2026-11-25_onednn_run2.json")

    def span(key: str, pick: Callable[[list], float]) -> Callable[[Any], float]:
        return lambda d: pick([_load(n)["configs"][c][key] for n in both for c in ("qm9_symdiff_s", "qm9_symdiff_l")])
    out.append(Check(doc, "dense layers (`kernels/linear.py`, docs/kernels.md) made training", both[0], (
        (span("speedup_train_vs_linear_aten", min), "{:.2f}"), (span("speedup_train_vs_linear_aten", max), "{:.2f}x"))))
    out.append(Check(doc, "faster in CPU time than torch's own GEMMs", both[0], (
        (span("speedup_train_cpu_s_vs_linear_aten", min), "{:.2f}"),
        (span("speedup_train_cpu_s_vs_linear_aten", max), "{:.2f}x"))))
    out.append(Check(doc, "measured 97.7 mol/s for SymDiff+", "model_speed_2026-11-25_quiet.json", (
        (lambda d: d["configs"]["qm9_symdiff_s"]["train"]["mol_per_s"], "{:.1f} mol/s for SymDiff+"),)))
    out.append(Check(doc, "mol/s for SymDiff+++ (`model_speed", "model_speed_2026-11-25_quiet.json", (
        (lambda d: d["configs"]["qm9_symdiff_l"]["train"]["mol_per_s"], "{:.1f} mol/s for SymDiff+++"),)))
    return out


EGNN_SBS = "side_by_side_egnn_2026-12-01.json"
PAPER = "paper_speed_tables.json"
EGNN_PARAMS = "egnn_params_official.json"


def _egnn_checks() -> list[Check]:
    """docs/benchmarks.md (our egnn against the official EGNN, the paper's tables) and the EGNN counts of
    docs/model.md."""
    doc = "docs/benchmarks.md"
    c = lambda d: d["configs"]["edm_plus"]  # noqa: E731
    out = [
        Check(doc, "| training, molecules/s |", EGNN_SBS, (
            (lambda d: c(d)["summary"]["official_molecules_per_s"], "{:.2f}"),
            (lambda d: c(d)["summary"]["project_molecules_per_s"], "{:.2f}"),
            (lambda d: c(d)["summary"]["ratio_project_over_official"], "{:.2f}"))),
        Check(doc, "| per pass |", EGNN_SBS, tuple(
            (lambda d, side=side, i=i: c(d)[side][i]["molecules_per_s"], "{:.2f}")
            for side in ("official", "project") for i in (0, 1))),
        Check(doc, "Goal: ours at least 1.5x the official", EGNN_SBS, (
            (lambda d: c(d)["summary"]["ratio_project_over_official"], "({:.2f}x)"),)),
        Check(doc, "the official step took", EGNN_SBS, (
            (lambda d: min(x for r in c(d)["official"] for x in r["step_s"]), "{:.0f}"),
            (lambda d: max(x for r in c(d)["official"] for x in r["step_s"]), "{:.0f} s"))),
        Check(doc, "load averages of", EGNN_SBS, (
            (lambda d: min(r[k][0] for side in ("official", "project") for r in c(d)[side]
                           for k in ("load_average_before", "load_average_after")), "{:.0f} to"),
            (lambda d: max(r[k][0] for side in ("official", "project") for r in c(d)[side]
                           for k in ("load_average_before", "load_average_after")), "to {:.0f} on"))),
        Check(doc, "--omp-wait-policy PASSIVE`, at commit", EGNN_SBS, (
            (lambda d: int(d["commit"][:7], 16), "{:x}"),)),
    ]
    bt = "train_egnn_symdiff_cpu_2026-12-01.json"
    row = lambda d, config: next(r for r in d["results"] if r["config"] == config)  # noqa: E731
    for label, config, sample in (("EDM+ (`qm9_edm_s`", "qm9_edm_s", True), ("EDM+++ (`qm9_edm_l`", "qm9_edm_l", False),
                                  ("SymDiff+ (`qm9_symdiff_s`", "qm9_symdiff_s", True)):
        vals = [(lambda d, config=config: row(d, config)["median_step_s"], "{:.2f} s"),
                (lambda d, config=config: row(d, config)["molecules_per_s_median_step"], "{:.2f}")]
        if sample:
            vals.append((lambda d, config=config: row(d, config)["sample"]["s_per_molecule_1000_steps"], "{:.1f}"))
        out.append(Check(doc, f"| {label}", bt, tuple(vals)))
    ratio = lambda d, b: next(r["molecules_per_s_ratio"] for r in d["ratios_same_run"] if r["slower"] == b)  # noqa
    out.append(Check(doc, "SymDiff+ over EDM+++ at the nearest budget", bt, (
        (lambda d: ratio(d, "qm9_edm_l"), "**{:.2f}x**"), (lambda d: ratio(d, "qm9_edm_s"), "{:.2f}x"))))
    out.append(Check(doc, "from commit 53fe933", bt, ((lambda d: int(d["commit"], 16), "{:x}"),)))
    for name, key in (("EDM+", "EDM+"), ("EDM++", "EDM++"), ("EDM+++", "EDM+++"), ("SymDiff+", "SymDiff+"),
                      ("SymDiff++", "SymDiff++"), ("SymDiff+++", "SymDiff+++")):
        out.append(Check(doc, f"| {name} |", PAPER, (
            (lambda d, key=key: d["qm9_table3"][key]["train_it_per_s"], "{:.2f}"),
            (lambda d, key=key: d["qm9_table3"][key]["s_per_sample"], "{:.2f}"))))
    for name in ("SymDiff+", "SymDiff++", "SymDiff+++"):
        out.append(Check(doc, f"| GEOM {name} |", PAPER, (
            (lambda d, name=name: d["geom_table11"][name]["train_it_per_s"], "{:.2f}"),
            (lambda d, name=name: d["geom_table11"][name]["s_per_sample"], "{:.2f}"))))
    out.append(Check(doc, "Its speed ratios at batch 256", PAPER, tuple(
        (lambda d, k=k: d["ratios"][k], "{:.2f}") for k in ("SymDiff+ / EDM+ it/s", "SymDiff+++ / EDM+++ it/s"))))
    out.append(Check(doc, "(the nearest parameter budgets)", PAPER, (
        (lambda d: d["ratios"]["SymDiff+ / EDM+++ it/s"], "{:.2f}"),)))
    out.append(Check(doc, "Our EDM+++ has", EGNN_PARAMS, (
        (lambda d: d["project_configs"]["qm9_edm_l"]["official_params"], "{:,}"),)))
    out.append(Check("README.md", "| EGNN parameter counts (EDM+", EGNN_PARAMS, tuple(
        (lambda d, config=config: d["project_configs"][config]["official_params"], "{:,}")
        for config in ("qm9_edm_s", "qm9_edm_m", "qm9_edm_l", "geom_edm_s"))))
    out.append(Check("README.md", "| training step, EDM+ EGNN", EGNN_SBS, (
        (lambda d: c(d)["summary"]["ratio_project_over_official"], "{:.2f}x"),
        (lambda d: c(d)["summary"]["project_molecules_per_s"], "ours {:.2f} mol/s"),
        (lambda d: c(d)["summary"]["official_molecules_per_s"], "official {:.2f} mol/s"))))
    for config in ("qm9_edm_s", "qm9_edm_m", "qm9_edm_l", "geom_edm_s"):
        out.append(Check("docs/model.md", f"| `configs/{config}.yaml` |", EGNN_PARAMS, (
            (lambda d, config=config: d["project_configs"][config]["official_params"], "{:,}"),)))
    return out


SIDE_BY_SIDE = "side_by_side_2026-12-01.json"
SIDE_BY_SIDE_2 = "side_by_side_2026-12-01_run2.json"

ODE_NLL = "eval_ode_nll_cpu_2026-12-01.json"


def _ode_nll_checks(doc: str) -> list[Check]:
    """The cost lines of the ODE likelihood (benchmarks/bench_ode_nll.py), one per process."""
    def cell(process: str, setting: str, key: str, median: bool = False) -> Callable[[Any], float]:
        def get(d: Any) -> float:
            v = d["cells"][f"{process}_{setting}"][key]
            return statistics.median(v) if median else v
        return get

    return [Check(doc, f"* `{p}` cost (", ODE_NLL, (
        (cell(p, "dopri5_tol1e-5", "field_evaluations_per_batch", True), "dopri5 {:.0f} field evaluations"),
        (cell(p, "dopri5_tol1e-5", "seconds_per_molecule_median"), "{:.1f} s per molecule"),
        (cell(p, "rk4_20", "field_evaluations_per_batch", True), "{:.0f} evaluations"),
        (cell(p, "rk4_20", "seconds_per_molecule_median"), "{:.2f} s per molecule"),
        (cell(p, "dopri5_tol1e-5", "load_average_1min"), "load average {:.1f}"),
        (cell(p, "rk4_20", "load_average_1min"), "and {:.1f})"))) for p in ("vpsde", "flow")]


# The rows of the table in docs/data.md "Building GEOM-Drugs at full scale": (row start, full file?, ranks); the
# shared-build rows (the kept build and a run of the same earlier code) are computed from their raw records.
BUILD_GEOM_ROWS = tuple((f"| {src} | {k} | with the index |", full, k)
                        for src, full in (("1 GB prefix, 1.03 GB", False), ("full file, 10.11 GB", True)) for k in (1, 2))
BUILD_GEOM_SHARED_ROWS = (("| 1 GB prefix, 1.03 GB | 2 | before the index |", False),
                          ("| full file, 10.11 GB | 2 | before the index |", True))


def _sb(full: bool, get: Callable[[dict], float]) -> Callable[[Any], float]:
    return lambda d: get(next(r for r in d["shared_build"] if (r["source_bytes"] > 5e9) == full))


CHECKS: list[Check] = [
    # ------------------------------------------------------------------ README "Measured"
    Check("README.md", "| EDM metrics, full QM9 test split", "eval_qm9_test_data_row.json", (
        (lambda d: d["atom_stability"], "{:.5f}"), (lambda d: d["mol_stability"], "{:.5f}"),
        (lambda d: d["validity"], "{:.5f}"), (lambda d: d["uniqueness"], "{:.3f}"))),
    Check("README.md", "| GEOM-Drugs sample (503 conformers)", "eval_geom_sample_file_bonds.json", (
        (lambda d: d["side_by_side"]["edm"]["atom_stability"], "{:.4f}"),
        (lambda d: d["side_by_side"]["revised"]["mol_stability"], "{:.3f}"))),
    Check("README.md", "| evaluation of 10,000 QM9 molecules", "eval_speed.json", (
        (lambda d: min(d["cli_qm9_wall_s"]), "{:.1f}"), (lambda d: max(d["cli_qm9_wall_s"]), "{:.1f}"),
        (lambda d: statistics.median(d["cli_qm9_cpu_s"]), "{:.1f}"))),
    Check("README.md", "| loader, QM9, one process", "data_loader.json", (
        (_loader("molecules_per_s_median", lambda v: min(v) / 1000), "{:.0f},000"),
        (_loader("molecules_per_s_median", lambda v: max(v) / 1000), "{:.0f},000"))),
    Check("README.md", "| shard build, full QM9 from npz", "data_build.json", (
        (_build(0), "{:.3f}"), (_build(1), "{:.3f}"))),
    Check("README.md", "| training, qm9_tiny, ZeRO-2", "train_cpu_2026-11-25.json", (
        (_train("qm9_tiny", 1, "it_per_s"), "{:.1f}"), (_train("qm9_tiny", 1, "molecules_per_s"), "{:.0f}"),
        (_train("qm9_tiny", 2, "it_per_s"), "{:.1f}"), (_train("qm9_tiny", 2, "molecules_per_s"), "{:.0f}"))),
    _sbs_row("README.md", "| training step, SymDiff+ ", SIDE_BY_SIDE, "symdiff_plus"),
    _sbs_row("README.md", "| training step, SymDiff+ ", SIDE_BY_SIDE_2, "symdiff_plus"),
    _sbs_row("README.md", "| training step, SymDiff+++", SIDE_BY_SIDE, "symdiff_ppp", undisturbed=True),
    Check("README.md", "| learning curve, qm9_tiny", "learning_curve_qm9_tiny_symdiff_2h.json", (
        (lambda d: pct(d["evals"][1]["atom_stability"]), "{:.1f}"), (lambda d: pct(d["evals"][1]["mol_stability"]),
                                                                     "{:.1f}"),
        (lambda d: d["evals"][1]["sampling_steps"], "{:.0f}-step"), (lambda d: d["evals"][1]["n_samples"], "{:,.0f}"))),
    *[Check("README.md", "| learning curve, qm9_tiny", f"learning_curve_qm9_tiny_{k}_2h.json", (
        (lambda d: pct(d["evals"][1]["atom_stability"]), "{:.1f}"),
        (lambda d: pct(d["evals"][1]["mol_stability"]), "{:.1f}"),
        (lambda d: d["evals"][1]["step"] / 1000, "{:.0f}k"))) for k in ("symdiff", "dit", "dit_aug", "symdiff_haar")],
    # ------------------------------------------------------------------ docs/eval.md
    Check("docs/eval.md", "| QM9 EDM test split, 13,083 molecules | EDM |", "eval_qm9_test_data_row.json", tuple(
        (lambda d, k=k: pct(d[k]), "{:.2f} %") for k in ("atom_stability", "mol_stability", "validity", "uniqueness",
                                                        "novelty"))),
    Check("docs/eval.md", "| same, bonds from `qm9_rdkit_graphs.npz` | revised |", "eval_qm9_test_revised.json", tuple(
        (lambda d, k=k: pct(d[k]), "{:.2f} %") for k in ("atom_stability", "mol_stability", "validity", "uniqueness",
                                                        "novelty"))),
    Check("docs/eval.md", "| GEOM-Drugs sample, 503 conformers of 10 molecules | EDM |",
          "eval_geom_sample_file_bonds.json", tuple(
              (lambda d, k=k: pct(d["side_by_side"]["edm"][k]), "{:.2f} %")
              for k in ("atom_stability", "mol_stability", "validity", "uniqueness"))),
    Check("docs/eval.md", "| same, bonds from the stored graphs | revised |", "eval_geom_sample_file_bonds.json",
          tuple((lambda d, k=k: pct(d["side_by_side"]["revised"][k]), "{:.2f} %")
                for k in ("atom_stability", "mol_stability", "validity", "uniqueness"))
          + ((lambda d: pct(d["side_by_side"]["revised"]["novelty"]), "{:.0f} %"),)),
    Check("docs/eval.md", "| same, bonds assigned from 3D | revised |", "eval_geom_sample_3d_bonds.json", tuple(
        (lambda d, k=k: pct(d[k]), "{:.2f} %") for k in ("atom_stability", "mol_stability", "validity", "uniqueness"))
          + ((lambda d: pct(d["novelty"]), "{:.0f} %"),)),
    Check("docs/eval.md", "comes back exactly from", "eval_bonds3d.json", (
        (lambda d: pct(d["sets"]["nitro"]["plain_correct"] / d["sets"]["nitro"]["n"]), "{:.1f} %"),
        (lambda d: d["sets"]["nitro"]["plain_correct"], "({:.0f})"),
        (lambda d: pct(d["sets"]["nitro"]["fixed_correct"] / d["sets"]["nitro"]["n"]), "{:.1f} %"),
        (lambda d: d["sets"]["nitro"]["fixed_correct"], "({:.0f})"))),
    Check("docs/eval.md", "with total charge 0", "eval_geom_sample_3d_bonds.json", (
        (lambda d: d["assigned_total_charges"]["0"], "({:.0f} with total charge 0"),
        (lambda d: d["assigned_total_charges"]["1"], "{:.0f} protonated"))),
    Check("docs/eval.md", "correct either way", "eval_bonds3d.json", (
        (lambda d: d["sets"]["no_charged_atoms"]["plain_correct"], "{:.0f} correct"),
        (lambda d: d["sets"]["no_charged_atoms"]["fixed_correct"], "{:.0f} correct"))),
    Check("docs/eval.md", "cached in `.cache/eval/`", "eval_speed.json", (
        (lambda d: d["novelty_cache_cold_build_s"], "{:.1f} s"),)),
    # ------------------------------------------------------------------ docs/data.md
    Check("docs/data.md", "train split this brings padding from", "data_loader.json", (
        (_loader("padding_fraction", min, budget=False), "{:.2f}"), (_loader("padding_fraction", max, budget=False),
                                                                     "{:.2f}"),
        (_loader("padding_fraction", min, budget=True), "{:.2f}"), (_loader("padding_fraction", max, budget=True),
                                                                    "{:.2f}"))),
    *[Check("docs/data.md", f"| {w} | {who} |", "scale_geom.json", (
        (_scale(w, "startup_s", before), "{:.2f}"), (_scale(w, "rss_mb", before), "{:.0f}"),
        (_scale(w, "bytes_read_per_epoch", before, 1e6), "{:,.1f}"), (_scale_ratio(w, before), "{:.3f}"),
        (_scale(w, "molecules_per_s", before), "{:,.0f}"), (_scale(w, "global_batches_per_s", before), "{:,.1f}"),
        (_scale(w, "padding_fraction", before), "{:.3f}"), (_scale(w, "resume_s", before), "{:.2f}")))
      for who, before in (("this", False), ("before", True)) for w in (1, 8, 64, 512)],
    Check("docs/data.md", "not GEOM-Drugs): ", "scale_geom.json", (
        (lambda d: d["build"]["n_molecules"], "{:,.0f} conformers"),
        (lambda d: d["build"]["n_shards"], "{:.0f} shards"),
        (lambda d: d["build"]["bytes_on_disk"] / 1e9, "{:.2f} GB"))),
    Check("docs/data.md", "The global token budget is", "scale_geom.json", (
        (lambda d: d["loader"]["max_atoms_per_batch"], "{:,.0f} atoms"),
        (_scale(512, "molecules_per_batch"), "{:.1f}"))),
    Check("docs/data.md", "global batches it went through, which was", "scale_geom.json", (
        (_scale(1, "fraction_of_epoch_measured"), "{:.2f} at W = 1"),
        (_scale(8, "fraction_of_epoch_measured"), "{:.2f} at W = 8"))),
    Check("docs/data.md", "MB of it Python, numpy and torch", "scale_geom.json", (
        (_scale(512, "rss_after_imports_mb"), "{:.0f} MB"),)),
    Check("docs/data.md", "at the start and", "scale_geom.json", (
        (lambda d: d["machine"]["load_average_1_5_15min"][0], "{:.1f} at the start"),
        (lambda d: d["load_average_end"][0], "{:.1f} at the end"))),
    Check("docs/data.md", "yes for the median rank", "scale_geom.json", ((_scale_ratio(512), "{:.3f} times"),)),
    Check("docs/data.md", "Not for the heaviest rank measured", "scale_geom.json", (
        (lambda d: _scale(512, "bytes_read_per_epoch_max_over_ranks")(d) * 512 / _scale(1, "bytes_read_per_epoch")(d),
         "{:.3f} at W = 512"),)),
    Check("docs/data.md", "Peak RSS under 1 GB at W = 512", "scale_geom.json", ((_scale(512, "rss_mb"), "{:.0f} MB"),)),
    Check("docs/data.md", "Start-up under 10 s:", "scale_geom.json", tuple(
        (lambda d, f=f, b=b: f(x["startup_s"] for r in (d["baseline"] if b else d)["ranks"] for x in r["runs"]),
         "{:.1f}")
        for b in (False, True) for f in (min, max))),
    Check("docs/data.md", "conformers/s per loader process: at W = 1", "scale_geom.json", (
        (_scale(1, "molecules_per_s"), "({:,.0f} a second)"),)),
    Check("docs/data.md", "keeps up with", "scale_geom.json", (
        (_scale(512, "global_batches_per_s"), "{:.1f} global"),)),
    Check("docs/data.md", "Projected for 64 H100s", "scale_geom.json", (
        (lambda d: d["projection_64_h100"]["gpus"], "{:.0f} H100s"), (lambda d: d["projection_64_h100"]["it_per_s"],
                                                                     "{:.2f} it/s"),
        (lambda d: d["projection_64_h100"]["global_batch"], "batch of {:.0f}"))),
    Check("docs/data.md", "an epoch of the", "scale_geom.json", (
        (lambda d: d["build"]["n_molecules"] / 1e6, "{:.2f}M"), (lambda d: d["projection_64_h100"]["epoch_hours"],
                                                                "{:.1f} h"),
        (lambda d: d["projection_64_h100"]["bytes_per_rank_per_epoch"] / 1e6, "{:.1f} MB"),
        (lambda d: d["projection_64_h100"]["mb_per_s_per_rank"], "{:.4f} MB/s"),
        (lambda d: d["projection_64_h100"]["bytes_all_ranks_per_epoch"] / 1e9, "{:.2f} GB"),
        (lambda d: d["projection_64_h100"]["mb_per_s_all_ranks"], "{:.3f} MB/s"))),
    Check("docs/data.md", "the previous loader read", "scale_geom.json", (
        (lambda d: d["baseline"]["projection_64_h100"]["bytes_per_rank_per_epoch"] / 1e9, "{:.2f} GB per rank"),
        (lambda d: d["baseline"]["projection_64_h100"]["bytes_all_ranks_per_epoch"] / 1e9, "{:.1f} GB per epoch"),
        (lambda d: d["baseline"]["projection_64_h100"]["mb_per_s_all_ranks"], "{:.1f} MB/s"))),
    Check("docs/data.md", "seconds per rank for the raw-xyz directory", "data_build.json", (
        (lambda d: d["results"][2]["rank_cpu_seconds_last"][0], "{:.2f} s serial"),
        (lambda d: d["results"][3]["rank_cpu_seconds_last"][0], "{:.2f}"),
        (lambda d: d["results"][3]["rank_cpu_seconds_last"][1], "{:.2f} s per rank"))),
    Check("docs/data.md", "s with 2 ranks); see", "data_build.json", (
        (lambda d: d["results"][2]["seconds_best"], "{:.2f} s serial"),
        (lambda d: d["results"][3]["seconds_best"], "{:.2f} s with 2 ranks"))),
    Check("docs/data.md", "about half the single-process rate", "data_loader.json", (
        (lambda d: min(r["molecules_per_s_median"] for r in d["results"]
                       if r["data"] == "QM9 train" and r.get("world_size") == 2) / 1000, "{:.0f},000"),
        (lambda d: max(r["molecules_per_s_median"] for r in d["results"]
                       if r["data"] == "QM9 train" and r.get("world_size") == 2) / 1000, "{:.0f},000"))),
    Check("docs/data.md", "Generation of the full file took", "build_geom_scale.json", (
        (lambda d: d["generation"]["full"]["seconds"], "{:.0f} s"),
        (lambda d: d["generation"]["full"]["molecules"], "{:,.0f} molecules"),
        (lambda d: d["generation"]["full"]["conformers"], "{:,.0f} conformers"),
        (lambda d: d["generation"]["full"]["bytes"] / 1e9, "{:.1f} GB"),
        (lambda d: d["generation"]["1gb"]["objects"], "{:.0f} objects"),
        (lambda d: d["generation"]["1gb"]["conformers"], "{:,.0f} conformers"),
        (lambda d: d["generation"]["1gb"]["seconds"], "{:.0f} s with 1 worker"))),
    Check("docs/data.md", "keeps the 30 lowest-energy conformers of each molecule", "build_geom_scale.json", (
        (lambda d: d["shared_build"][0]["conformers"], "{:,.0f} conformers"),
        (lambda d: d["shared_build"][0]["atoms"] / 1e6, "{:.1f}M atoms"),
        (lambda d: d["shared_build"][0]["wall_s"], "{:.0f} s wall"),
        (lambda d: d["shared_build"][0]["rank_cpu_s"][0], "{:.0f}"),
        (lambda d: d["shared_build"][0]["rank_cpu_s"][1], "{:.0f} CPU seconds"),
        (lambda d: d["shared_build"][0]["rank_peak_rss_mb"][0], "{:.0f}"),
        (lambda d: d["shared_build"][0]["rank_peak_rss_mb"][1], "{:.0f} MB per rank"))),
    *[Check("docs/data.md", row, "build_geom_scale.json", (
        (_bgs(full, ranks, "conformers"), "{:,.0f}"), (_bgs(full, ranks, "peak_rss_mb_per_rank_max"), "{:.0f} MB"),
        (_bgs(full, ranks, "conformers_per_s_per_rank_wall"), "{:,.0f}"),
        (_bgs(full, ranks, "conformers_per_cpu_s_per_rank"), "{:,.0f}")))
      for row, full, ranks in BUILD_GEOM_ROWS],
    *[Check("docs/data.md", row, "build_geom_scale.json", (
        (_sb(full, lambda r: r["conformers"]), "{:,.0f}"),
        (_sb(full, lambda r: max(r["rank_peak_rss_mb"])), "{:.0f} MB"),
        (_sb(full, lambda r: round(r["conformers"] / r["wall_s"] / r["ranks"])), "{:,.0f}"),
        (_sb(full, lambda r: round(r["conformers"] / sum(r["rank_cpu_s"]))), "{:,.0f}")))
      for row, full in BUILD_GEOM_SHARED_ROWS],
    Check("docs/data.md", "Peak RSS per rank does not grow with the source", "build_geom_scale.json", (
        (lambda d: d["rss_full_over_small"]["1"], "{:.3f} serial"),
        (lambda d: d["rss_full_over_small"]["2"], "{:.3f} with 2 ranks with this code"),
        (lambda d: d["shared_build_rss_full_over_small"]["2"], "{:.3f} with 2 ranks with the code before the index"))),
    Check("docs/data.md", "Projected wall time on idle cores for K ranks", "build_geom_scale.json", (
        (lambda d: d["projection"]["wall_s"]["8"], "{:.0f} s at K = 8"),
        (lambda d: d["projection"]["wall_s"]["64"], "{:.0f} s at K = 64"),
        (lambda d: d["projection"]["wall_s"]["512"], "{:.0f} s at K = 512"),
        (lambda d: d["projection"]["startup_cpu_s"], "({:.1f} s)"),
        (lambda d: d["projection"]["index_scan"]["cpu_s_scaled_to_full"], "({:.0f} s"),
        (lambda d: d["projection"]["rate_conformers_per_s_per_rank"], "{:,.0f} conformers/s"))),
    # ------------------------------------------------------------------ docs/kernels.md
    Check("docs/kernels.md", "- Gaussian forward:", "kernels_sm90_build_2026-11-25.json", (
        (_regs("gaussian_fwd"), "{:.0f} registers"),)),
    Check("docs/kernels.md", "- Gaussian backward:", "kernels_sm90_build_2026-11-25.json", (
        (_regs("gaussian_bwd"), "{:.0f} registers"),)),
    Check("docs/kernels.md", "- CoM:", "kernels_sm90_build_2026-11-25.json", (
        (lambda d: min(r["registers"] for r in d if r["kernel"].startswith("com_")), "{:.0f}"),
        (lambda d: max(r["registers"] for r in d if r["kernel"].startswith("com_")), "{:.0f} registers"))),
    Check("docs/kernels.md", "- QR:", "kernels_sm90_build_2026-11-25.json", (
        (_regs("qr_fwd"), "{:.0f} (forward)"), (_regs("qr_bwd"), "{:.0f} (backward)"))),
    Check("docs/kernels.md", r"re:^\| 1 \| ", "linear_cpu_2026-11-25.json", (
        (lambda d: d["summary"]["1"]["median_speedup_cpu"], "{:.2f}x"),
        (_gemm(1, "speedup_cpu", min), "{:.2f}x"), (_gemm(1, "speedup_cpu", max), "{:.2f}x"),
        (_gemm(1, "max_rel_diff", max), "{:.1e}"))),
    Check("docs/kernels.md", r"re:^\| 2 \| ", "linear_cpu_2026-11-25.json", (
        (lambda d: d["summary"]["2"]["median_speedup_cpu"], "{:.2f}x"),
        (_gemm(2, "speedup_cpu", min), "{:.2f}x"), (_gemm(2, "speedup_cpu", max), "{:.2f}x"),
        (_gemm(2, "max_rel_diff", max), "{:.1e}"))),
    Check("docs/kernels.md", '"Ceilings" measured in that run', "kernels_cpu_2026-11-25.json", (
        (lambda d: d["ceilings"]["copy_GBps"], "{:.1f} GB/s"),
        (lambda d: 1000 * d["ceilings"]["matmul_fp32_TFLOPs"], "{:.0f} GFLOP/s"))),
    Check("docs/kernels.md", "GEMMs of a SymDiff step, 1 thread) ran at", "linear_cpu_2026-11-25.json", (
        (_gemm(1, "aten_gflops_cpu", min), "{:.0f}"), (_gemm(1, "aten_gflops_cpu", max), "{:.0f}"),
        (_gemm(1, "onednn_gflops_cpu", min), "{:.0f}"), (_gemm(1, "onednn_gflops_cpu", max), "{:.0f}"))),
    Check("docs/kernels.md", "GEMMs of a SymDiff step, 1 thread) ran at", "linear_cpu_2026-11-25.json", (
        (lambda d: min(r["aten_gflops_cpu"] for r in d["rows"] if r["threads"] == 1)
         / (1000 * _load("kernels_cpu_2026-11-25.json")["ceilings"]["matmul_fp32_TFLOPs"]), "{:.1f}"),
        (lambda d: max(r["onednn_gflops_cpu"] for r in d["rows"] if r["threads"] == 1)
         / (1000 * _load("kernels_cpu_2026-11-25.json")["ceilings"]["matmul_fp32_TFLOPs"]), "{:.1f}x"))),
    Check("docs/kernels.md", "SymDiff+ 1.19-1.21x faster in wall time", "model_speed_2026-11-25_onednn.json", (
        (lambda d: d["configs"]["qm9_symdiff_s"]["speedup_train_vs_linear_aten"], "{:.2f}"),
        (lambda d: d["configs"]["qm9_symdiff_s"]["speedup_train_cpu_s_vs_linear_aten"], "{:.2f}"))),
    Check("docs/kernels.md", "SymDiff+ 1.19-1.21x faster in wall time", "model_speed_2026-11-25_onednn_run2.json", (
        (lambda d: d["configs"]["qm9_symdiff_s"]["speedup_train_vs_linear_aten"], "{:.2f}x"),
        (lambda d: d["configs"]["qm9_symdiff_s"]["speedup_train_cpu_s_vs_linear_aten"], "{:.2f}x"))),
    *_kernel_rows("docs/kernels.md"),
    # ------------------------------------------------------------------ docs/model.md
    _sbs_row("docs/model.md", "| SymDiff+ training, molecules/s, run 1 |", SIDE_BY_SIDE, "symdiff_plus", shares=True),
    _sbs_row("docs/model.md", "| SymDiff+ training, molecules/s, run 2 |", SIDE_BY_SIDE_2, "symdiff_plus",
             shares=True),
    _sbs_row("docs/model.md", "| SymDiff+++ training, molecules/s, all steps |", SIDE_BY_SIDE, "symdiff_ppp",
             shares=True),
    _sbs_row("docs/model.md", "| SymDiff+++ training, molecules/s, undisturbed steps |", SIDE_BY_SIDE, "symdiff_ppp",
             undisturbed=True),
    Check("docs/model.md", "official steps and", SIDE_BY_SIDE, (
        (lambda d: sum(r["undisturbed"]["steps"] for r in d["configs"]["symdiff_ppp"]["official"]), "{:.0f} official"),
        (lambda d: sum(r["undisturbed"]["steps"] for r in d["configs"]["symdiff_ppp"]["project"]), "{:.0f} of the"),
        (lambda d: d["configs"]["symdiff_ppp"]["summary"]["undisturbed_steps"]["passes_with_such_steps"][0],
         "in {:.0f} passes"))),
    Check("docs/model.md", "the same load all through (load average", SIDE_BY_SIDE, (
        (_load_range("symdiff_plus", min, SIDE_BY_SIDE, SIDE_BY_SIDE_2), "{:.1f}"),
        (_load_range("symdiff_plus", max, SIDE_BY_SIDE, SIDE_BY_SIDE_2), "{:.1f})"))),
    Check("docs/model.md", "The project's first two passes had the machine", SIDE_BY_SIDE, (
        (_load_range("symdiff_ppp", min, SIDE_BY_SIDE), "{:.1f}"),
        (_load_range("symdiff_ppp", max, SIDE_BY_SIDE), "{:.1f})"))),
    *_speed_checks("docs/model.md"),
    *_lc_checks("docs/model.md"),
    *_pd_checks("docs/model.md"),
    *_quotient_checks("docs/quotient.md"),
    *_quotient_train_checks("docs/quotient.md"),
    *_quality_checks("docs/benchmarks.md"),
    *[_recipe_row("docs/training.md", *row) for row in RECIPE_ROWS],
    *_steps_checks("docs/model.md"),
    *_ode_nll_checks("docs/model.md"),
    Check("docs/model.md", "At t0 = 0 the data's own values", "partial_denoise_qm9_tiny_symdiff_haar_120min.json", (
        (_pd(0, "atom_stability"), "{:.1f}"), (_pd(0, "mol_stability"), "{:.1f}"))),
    Check("docs/model.md", "At t0 = 0 the data's own values", "partial_denoise_qm9_tiny_dit_120min.json", (
        (_pd(0, "atom_stability"), "{:.1f}"), (_pd(0, "mol_stability"), "{:.0f}"))),
    Check("docs/model.md", "so `symdiff` managed", "learning_curve_qm9_tiny_symdiff_2h.json", (
        (lambda d: d["train_s_per_step"], "{:.3f} s per step"),)),
    Check("docs/model.md", "and ran at", "learning_curve_qm9_tiny_symdiff_haar_2h.json", (
        (lambda d: d["train_s_per_step"], "{:.3f}"),)),
    Check("docs/model.md", "and ran at", "learning_curve_qm9_tiny_dit_aug_2h.json", (
        (lambda d: d["train_s_per_step"], "{:.3f} s per step"),)),
    Check("docs/model.md", "more steps than `symdiff`", "learning_curve_qm9_tiny_dit_2h.json", (
        (lambda d: pct(d["steps"] / _load("learning_curve_qm9_tiny_symdiff_2h.json")["steps"] - 1), "{:.0f}%"),)),
    Check("docs/model.md", "more steps than `symdiff`", "learning_curve_qm9_tiny_dit_aug_2h.json", (
        (lambda d: pct(d["steps"] / _load("learning_curve_qm9_tiny_dit_2h.json")["steps"] - 1), "{:.0f}%"),)),
    *[Check("docs/model.md", "Molecule stability is", f"learning_curve_qm9_tiny_{k}_2h.json", (
        (lambda d, i=i: pct(d["evals"][i]["atom_stability"]), "{:.1f}%"),
        (lambda d, i=i: d["evals"][i]["step"] / 1000, "({:.0f}k)"))) for k, i in
      (("symdiff", 1), ("symdiff_haar", 0), ("dit_aug", 0), ("dit", 1))],
    Check("docs/model.md", "loss went from", "learning_curve_qm9_tiny_symdiff_2h.json", (
        (_loss_at(10000), "{:.3f} at step 10k"), (_loss_at(50000), "{:.3f} at 50k"))),
    Check("docs/model.md", "loss went from", "learning_curve_qm9_tiny_symdiff_haar_2h.json", (
        (_loss_at(10000), "from {:.3f} at 10k"), (_loss_at(87000), "{:.3f} at 87k"))),
    *[Check("docs/model.md", "Two hours here is", f"learning_curve_qm9_tiny_{k}_2h.json", (
        (lambda d: d["steps"] * d["batch_size"] / 100_000, "{:.0f}"),)) for k in ("symdiff", "symdiff_haar")],
    Check("docs/training.md", "alternating passes in one run on", "bench_precision_cpu.json", (
        (lambda d: d["median"]["fp32"]["it_per_s"], "fp32 {:.2f} it/s"),
        (lambda d: d["median"]["bf16"]["it_per_s"], "bf16 {:.2f} it/s"),
        (lambda d: d["bf16_over_fp32_it_per_s"], "({:.2f}x)"))),
    *_egnn_checks(),
    Check("docs/training.md", "are stable and in the training set (atom stability", "memorise_qm9_64.json", MEMORISE),
    Check("docs/training.md", "The whole check with `model.time_input=log_snr`", "memorise_qm9_64_log_snr.json", MEMORISE),
    Check("docs/training.md", "Partial denoising of the same 64 training molecules", "partial_denoise_memorise_qm9_64.json",
          tuple((_pd(t0, "mol_stability"), "{:.1f}%") for t0 in (0, 10, 50, 100))),
    *[Check("docs/training.md", "One option screened at equal steps", f"partial_denoise_memorise_qm9_64_step4000_{k}.json",
            ((_pd(10, "mol_stability"), "{:.1f}%"), (_pd(50, "mol_stability"), "{:.1f}%"))) for k in ("paper", "log_snr")],
    Check("docs/model.md", "stability as the 250-step sampler", "rescore_qm9_tiny_symdiff_60min_1000_vs_250_steps.json",
          ((lambda d: pct(d["rescores"][0]["atom_stability"]), "{:.1f}%"),
           (lambda d: pct(d["rescores"][1]["atom_stability"]), "{:.1f}%"))),
]


# Figures quoted from the peer's own record rather than from a JSON here: each must appear in that file. Skipped
# where ../shared is absent (a fresh clone).
PEER_README = REPO.parent / "shared" / "peers" / "symdiff_official" / "README.md"
PEER_QUOTES: list[tuple[str, str, tuple[str, ...]]] = [
    ("docs/model.md", "from that file, and this repository has no JSON", ("0.93", "1.09")),
    ("docs/model.md", "Sampling, 1,000 steps at batch 100: the project was", ("1.94", "1.80")),
    ("docs/model.md", "SymDiff+ and 1.60x / 1.51x for SymDiff+++", ("1.60", "1.51")),
    ("docs/model.md", "(SymDiff+ with ACTIVE:", ("1.20x",)),
    ("docs/model.md", "project at commit", ("36eae88",)),
    ("README.md", "| training step, SymDiff+ ", ("0.93",)),
    ("README.md", "| training step, SymDiff+++", ("1.09",)),
    ("README.md", "| sampling, 1,000 steps, batch 100, side by side", ("1.94", "1.80", "1.60", "1.51")),
]


def peer_quotes(root: Path, peer_readme: Path = PEER_README) -> list[str]:
    if not peer_readme.is_file():
        return []
    peer = peer_readme.read_text(encoding="utf-8")
    errors = []
    for doc, anchor, figures in PEER_QUOTES:
        found = _line_and_section((root / doc).read_text(encoding="utf-8"), anchor)
        if found is None:
            errors.append(f"{doc}: no single line holds '{anchor}'")
            continue
        for fig in figures:
            if not _contains_number(found[0], fig):
                errors.append(f"{doc}: '{anchor}': the line no longer quotes {fig}")
            elif not _contains_number(peer, fig):
                errors.append(f"{doc}: '{anchor}': {fig} is not in {peer_readme}")
    return errors


def _fmt(fmt: str, value: float) -> str:
    return re.sub(r"e([-+])0*(\d)", r"e\1\2", fmt.format(value)).replace("e+", "e")  # 1.3e-06 -> 1.3e-6


def _line_and_section(text: str, anchor: str) -> tuple[str, str] | None:
    """The one line holding the anchor, and the text of its section (heading to heading)."""
    lines = text.splitlines()
    hits = [i for i, ln in enumerate(lines) if _anchor_match(anchor, ln)]
    if len(hits) != 1:
        return None
    i = hits[0]
    start = max([j for j in range(i + 1) if lines[j].startswith("#")], default=0)
    end = min([j for j in range(i + 1, len(lines)) if lines[j].startswith("#")], default=len(lines))
    return lines[i], "\n".join(lines[start:end])


def _anchor_match(anchor: str, line: str) -> bool:
    return re.search(anchor[3:], line) is not None if anchor.startswith("re:") else anchor in line


def _names(section: str, json_name: str) -> bool:
    """The section names the file, literally or by a pattern such as learning_curve_qm9_tiny_<kind>_2h.json."""
    if json_name in section:
        return True
    for pattern in re.findall(r"[\w\-<>|]*<[\w|]+>[\w\-<>|]*\.json\b", section):
        rx = "".join("[^/]+" if part.startswith("<") else re.escape(part)
                     for part in re.split(r"(<[\w|]+>)", pattern))
        if re.fullmatch(rx, json_name):
            return True
    return False


def _contains_number(line: str, shown: str) -> bool:
    # a figure matches only as a whole: "0.76" must not match inside "10.764", nor "76.7" inside "76.75"
    return re.search(r"(?<![\d.,])" + re.escape(shown) + r"(?![\d])", line) is not None


def run_check(check: Check, root: Path) -> list[str]:
    doc_path, json_path = root / check.doc, root / RESULTS / check.json
    if not doc_path.is_file():
        return [f"{check.doc}: missing"]
    if not json_path.is_file():
        return [f"{check.doc}: '{check.anchor}' quotes {RESULTS / check.json}, which does not exist"]
    found = _line_and_section(doc_path.read_text(encoding="utf-8"), check.anchor)
    if found is None:
        return [f"{check.doc}: no single line holds '{check.anchor}'"]
    line, section = found
    errors = []
    if not _names(section, check.json):
        errors.append(f"{check.doc}: '{check.anchor}': {check.json} is not named in the line or its section")
    data = json.loads(json_path.read_text(encoding="utf-8"))
    for n, (get, fmt) in enumerate(check.values):
        try:
            shown = _fmt(fmt, get(data))
        except (KeyError, IndexError, TypeError, ValueError, StopIteration) as exc:
            errors.append(f"{check.doc}: '{check.anchor}': {check.json} lacks value {n + 1} ({exc!r})")
            continue
        if not _contains_number(line, shown):
            errors.append(f"{check.doc}: '{check.anchor}': {check.json} holds {shown}, the line says: {line.strip()}")
    return errors


# How result files are named (a bare name in a document is taken for one when it looks like this).
RESULT_NAME = (r"^(eval|data|kernels|linear|model|learning|partial|rescore|train|side|quotient|steps|scale|build"
               r"|memorise|quality|recipe|paper)_[\w.\-]+\.json$")


def named_results(root: Path) -> list[str]:
    """Every benchmarks/results/*.json a document names must exist."""
    errors = []
    for doc in DOCS:
        path = root / doc
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        for prefix, name in sorted(set(re.findall(r"(benchmarks/results/)?([\w.\-]+\.json)\b", text))):
            if not prefix and not re.match(RESULT_NAME, name):
                continue  # not a result file (manifest.json, a config, an output the user names)
            if not (root / RESULTS / name).is_file():
                errors.append(f"{doc}: names {RESULTS / name}, which does not exist")
    return errors


def check_all(root: Path = REPO) -> list[str]:
    _ROOT[0] = root
    errors = named_results(root) + peer_quotes(root)
    for check in CHECKS:
        errors += run_check(check, root)
    return errors


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(REPO), help="repository root (default: this checkout)")
    errors = check_all(Path(ap.parse_args().root))
    for e in errors:
        print(e)
    print(f"{len(CHECKS)} checks, {len(errors)} mismatches")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
