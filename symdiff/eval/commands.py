"""`symdiff eval`: metrics of generated molecules (or of a dataset split) under the EDM and revised protocols."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from symdiff.devices import DEVICE_HELP, resolve_device
from symdiff.errors import UserError
from symdiff.outputs import add_overwrite_flag, check_output_dir, check_output_file, write_text_atomic

ROWS = [("n_molecules", "molecules", "d"), ("atom_stability", "atom stability", "%"),
        ("mol_stability", "molecule stability", "%"), ("validity", "validity", "%"),
        ("sanitizable", "  sanitisable", "%"), ("connected", "  connected", "%"),
        ("uniqueness", "uniqueness (of valid)", "%"), ("valid_and_unique", "valid and unique", "%"),
        ("novelty", "novelty (of unique)", "%"), ("n_excluded", "excluded inputs", "d")]


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--samples", metavar="FILE", help="molecules to evaluate: .sdf (with or without bonds), "
                     "multi-molecule .xyz, or a symdiff .npz sample file")
    src.add_argument("--reference-split", metavar="NAME", help="evaluate the dataset's own molecules instead "
                     "(QM9: train/valid/test; GEOM without --data-root: sample)")
    src.add_argument("--nll", metavar="RUN_OR_CKPT", help="test NLL of a trained model (run dir, checkpoint dir "
                     "or exported .pt) on a shard split, mean over --passes: the paper's Jensen bound (vdm) or the "
                     "bound through the process's ODE (vpsde, flow)")
    p.add_argument("--dataset", required=True, choices=["qm9", "geom"], help="selects bond rules and alphabet")
    p.add_argument("--protocol", choices=["edm", "revised"], default="edm",
                   help="primary protocol (top-level JSON keys); GEOM always reports both side by side")
    p.add_argument("--data-root", metavar="DIR", help="shard directory for --reference-split and novelty")
    p.add_argument("--json", metavar="OUT", help="write the metrics as JSON")
    p.add_argument("--report", metavar="DIR", help="write a report: PNG grid, histograms, markdown summary")
    add_overwrite_flag(p)
    p.add_argument("--no-novelty", action="store_true", help="skip novelty (no training SMILES needed)")
    p.add_argument("--bonds", choices=["auto", "3d"], default="auto",
                   help="revised protocol: 'auto' uses the file's bonds where it has them, '3d' always "
                        "assigns bonds from coordinates")
    p.add_argument("--split", metavar="NAME", help="--nll: the split (default: the config's test split)")
    p.add_argument("--passes", type=int, default=1, help="--nll: passes over the split (paper: QM9 5, GEOM 1)")
    p.add_argument("--batch-size", type=int, help="--nll: molecules per batch (default: the config's)")
    p.add_argument("--device", default="cpu", help=f"--nll: torch device, {DEVICE_HELP}")
    p.add_argument("--seed", type=int, default=0, help="--nll: seed of torch's RNG")
    p.add_argument("--max-molecules", type=int, help="--nll: only the first N molecules of the split")
    p.add_argument("--ode-solver", choices=["dopri5", "rk4"], help="--nll of vpsde/flow: adaptive Dormand-Prince "
                   "(default) or fixed-step RK4")
    p.add_argument("--ode-tol", type=float, help="--nll of vpsde/flow, dopri5: its rtol = atol (default 1e-5)")
    p.add_argument("--ode-steps", type=int, help="--nll of vpsde/flow, rk4: steps (default 100)")
    p.add_argument("--probes", type=int, help="--nll of vpsde/flow: Hutchinson probes per molecule (default 1)")
    p.add_argument("--probe", choices=["rademacher", "gaussian"], help="--nll of vpsde/flow: the Hutchinson probe "
                   "(default rademacher)")
    p.add_argument("--trust-pickle", action="store_true", help="--nll: load a checkpoint that needs Python objects "
                   "beyond tensors (that can run code: only for files you trust)")
    p.add_argument("--valency-table", metavar="JSON", help="revised protocol: a valency table other than the "
                   "shipped one (see symdiff.eval.valency)")


def _fmt(v: object, kind: str) -> str:
    if v is None:
        return "-"
    return f"{v:d}" if kind == "d" else f"{100 * v:6.2f}"


def format_table(results: dict[str, dict]) -> str:
    names = list(results)
    width = 26
    lines = [f"{'metric':<{width}}" + "".join(f"{n:>12}" for n in names)]
    for key, label, kind in ROWS:
        if not any(key in r for r in results.values()):
            continue
        lines.append(f"{label:<{width}}" + "".join(f"{_fmt(results[n].get(key), kind):>12}" for n in names))
    return "\n".join(lines)


def _load_input(args: argparse.Namespace) -> tuple:
    from symdiff.eval.reference import load_reference
    from symdiff.io.molfiles import read_records

    if args.samples:
        rec = read_records(args.samples)
        return rec.mols, rec.bonds, f"{args.samples} ({len(rec.mols)} molecules)"
    ref = load_reference(args.dataset, args.reference_split, args.data_root, with_bonds=True)
    return ref.mols, ref.bonds, ref.description


def _check_outputs(args: argparse.Namespace) -> None:
    """--json and --report are checked before any metric is computed: a bad path found afterwards loses the work."""
    from symdiff.eval.report import REPORT_FILES

    if args.json:
        if args.samples and Path(args.json).resolve() == Path(args.samples).resolve():
            raise UserError(f"--json {args.json}: is the --samples input; name another file")
        check_output_file(args.json, "--json", args.overwrite)
    if args.report:
        if args.nll:
            raise UserError("--report: not available with --nll (use --json)")
        check_output_dir(args.report, "--report", args.overwrite)
    if args.json and args.report and Path(args.json).resolve().parent == Path(args.report).resolve() \
            and Path(args.json).name in REPORT_FILES:
        raise UserError(f"--json {args.json}: the report writes a file of the same name into --report")


def run(args: argparse.Namespace) -> int:
    from symdiff.eval import metrics, reference

    _check_outputs(args)
    if args.data_root:  # the names a config's data.root takes (bundled:qm9), resolved the same way
        from symdiff.data.roots import resolve

        args.data_root = resolve(args.data_root, Path.cwd())
    if args.nll:
        return _run_nll(args)
    t0 = time.perf_counter()
    mols, bonds, description = _load_input(args)
    include, reasons = metrics.screen(mols, args.dataset)
    protocols = ["edm", "revised"] if args.dataset == "geom" else [args.protocol]
    if args.protocol not in protocols:
        protocols.insert(0, args.protocol)
    results: dict[str, dict] = {}
    for name in protocols:
        if name == "edm":
            train = None if args.no_novelty else reference.edm_train_smiles(args.dataset, args.data_root)
            results["edm"] = metrics.evaluate_edm_protocol(mols, args.dataset, train, include, reasons)
        else:
            from symdiff.eval.valency import load_table

            table = load_table(args.dataset, args.valency_table)
            train = None if args.no_novelty else reference.canonical_train_smiles(args.dataset)
            file_bonds = bonds if args.bonds == "auto" else None
            results["revised"] = metrics.evaluate_revised_protocol(mols, args.dataset, file_bonds, train, table,
                                                                   include, reasons)
    if args.no_novelty:
        for r in results.values():
            r["notes"] = [n if not n.startswith("novelty not computed") else "novelty skipped (--no-novelty)"
                          for n in r["notes"]]
    elapsed = time.perf_counter() - t0
    primary = metrics.public(results[args.protocol])
    out = {**primary, "input": description, "elapsed_s": round(elapsed, 3)}
    if len(results) > 1:
        out["side_by_side"] = {k: metrics.public(v) for k, v in results.items()}
    print(f"symdiff eval: {description}")
    print(format_table(results))
    prim = results[args.protocol]
    for reason, n in prim.get("exclusions", {}).items():
        print(f"  excluded from the bond analysis (scored unstable and invalid): {n} molecule(s): {reason}")
    for ex in prim.get("excluded_examples", [])[:5]:
        print(f"    molecule {ex['index']} (id {ex['mol_id']}): {ex['reason']}")
    for r in results.values():
        for note in r.get("notes", []):
            print(f"  note ({r['protocol']}): {note}")
    print(f"RDKit {metrics.rdkit_version()}, {elapsed:.2f} s")
    if args.json:
        write_text_atomic(args.json, json.dumps(out, indent=2) + "\n", "--json")
    if args.report:
        from symdiff.eval.report import write_report

        write_report(Path(args.report), mols, results, args.dataset, description)
        print(f"report written to {args.report}")
    return 0



def _run_nll(args: argparse.Namespace) -> int:
    from symdiff.eval.nll import run_split_nll

    if args.passes < 1:
        raise UserError(f"--passes {args.passes}: must be at least 1")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: must be at least 1")
    if args.max_molecules is not None and args.max_molecules < 1:
        raise UserError(f"--max-molecules {args.max_molecules}: must be at least 1")
    ode = {key: value for key, value in (("solver", args.ode_solver), ("rtol", args.ode_tol), ("atol", args.ode_tol),
                                         ("steps", args.ode_steps), ("n_probes", args.probes), ("probe", args.probe))
           if value is not None}
    device = resolve_device(args.device)
    if not Path(args.nll).exists():
        raise UserError(f"--nll {args.nll}: no such file or directory")
    res = run_split_nll(args.nll, args.data_root, args.split, args.passes, args.batch_size, str(device),
                        seed=args.seed, trust_pickle=args.trust_pickle, ode=ode, max_molecules=args.max_molecules)
    out = {"protocol": "nll", "dataset": args.dataset, **res}
    spread = "" if res["nll_std_over_passes"] is None else f" (std over passes {res['nll_std_over_passes']:.3f})"
    print(f"symdiff eval: NLL of {args.nll} on split '{res['split']}' of {res['data_root']}: "
          f"{res['nll']:.3f} nats per molecule{spread}, {res['n_molecules']} molecules, {res['passes']} pass(es), "
          f"{res['weights']} weights, {res['seconds']:.1f} s; {res['likelihood']}")
    print(f"symdiff eval: unlabelled (atoms up to order: minus the mean log N! = {res['log_labellings']:.3f}): "
          f"{res['nll_unlabelled']:.3f} nats per molecule")
    if args.json:
        write_text_atomic(args.json, json.dumps(out, indent=2) + "\n", "--json")
    return 0
