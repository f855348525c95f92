"""Learning curve of a small model on real QM9 on this CPU: loss, and EDM stability/validity of samples.

Trains in one process on the EDM training split of ../shared/data/qm9/qm9.npz (random batches, seeded) for a
wall-clock budget, with the paper's optimiser (AdamW amsgrad, global-norm clip 2.0) and an EMA of all weights.
At every evaluation point it samples molecules from the EMA weights (sizes from the training histogram) and scores
them with the EDM protocol (`symdiff.eval.metrics.evaluate_edm_protocol`). Evaluation time is not counted in the
training budget but is recorded. The result JSON is rewritten after every evaluation, so a cut-off run keeps its
curve so far.

Usage: .venv/bin/python benchmarks/bench_model_learning_curve.py --config configs/qm9_tiny.yaml
           [--kind dit|dit_aug|symdiff_haar|symdiff] [--budget-min 120] [--eval-every-min 20]
           [--eval-samples 1000] [--eval-steps 1000] [--out benchmarks/results/learning_curve_<kind>.json]
           [--save-ema runs/lc/<kind>_ema.pt]
       .venv/bin/python benchmarks/bench_model_learning_curve.py --rescore runs/lc/<kind>_ema.pt --eval-steps 1000
           --out benchmarks/results/learning_curve_<kind>.json     (re-score saved EMA weights, e.g. full sampler)
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

# Must precede the OpenMP runtime (torch import). On a shared, oversubscribed machine spinning OpenMP threads wait
# on each other for whole time slices: a 2-thread step measured 15 s with the default policy, 0.12 s passive.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def load_qm9(path: Path):
    from symdiff.data.molecules import MoleculeSet

    d = np.load(path)
    mols = MoleculeSet(atomic_numbers=d["atomic_numbers"], positions=d["positions"], offsets=d["offsets"],
                       mol_ids=d["mol_id"].astype(np.int64))
    return mols, np.nonzero(d["split_edm"] == 0)[0]


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def evaluate(ema_model, n: int, steps: int, seed: int) -> dict:
    from symdiff.eval.metrics import evaluate_edm_protocol
    from symdiff.sampling import sample_molecules

    t = time.perf_counter()
    state = torch.random.get_rng_state()
    mols = sample_molecules(ema_model, n, batch_size=100, steps=steps, seed=seed, progress=False)
    torch.random.set_rng_state(state)  # evaluation must not change the training's random stream
    res = evaluate_edm_protocol(mols, "qm9")
    return {"atom_stability": res["atom_stability"], "mol_stability": res["mol_stability"],
            "validity": res["validity"], "uniqueness": res.get("uniqueness"), "n_samples": n,
            "sampling_steps": steps, "eval_seconds": time.perf_counter() - t}


def rescore(args: argparse.Namespace) -> int:
    from symdiff.config import from_dict
    from symdiff.models import build_model

    saved = torch.load(args.rescore, map_location="cpu", weights_only=False)
    model = build_model(from_dict(saved["config"]))
    model.load_state_dict(saved["ema"])
    model.eval()
    ev = evaluate(model, args.eval_samples, args.eval_steps, seed=args.seed + 5000)
    ev.update({"step": saved["step"], "weights": str(args.rescore), "threads": args.threads,
               "load_average": list(os.getloadavg())})
    print(json.dumps(ev), flush=True)
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    result.setdefault("rescores", []).append(ev)
    write_json(out, result)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "qm9_tiny.yaml"))
    ap.add_argument("--kind", default=None, help="override model.kind")
    ap.add_argument("--budget-min", type=float, default=120.0, help="training wall-clock budget (minutes)")
    ap.add_argument("--eval-every-min", type=float, default=20.0)
    ap.add_argument("--eval-samples", type=int, default=1000)
    ap.add_argument("--eval-steps", type=int, default=1000, help="reverse steps per sample (< 1000: strided)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: data.batch_size of the config")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "qm9" / "qm9.npz"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--save-ema", default=None,
                    help="also write the EMA weights (torch state_dict) here at every evaluation, for later re-scoring")
    ap.add_argument("--rescore", default=None, metavar="EMA_PT",
                    help="no training: score the EMA weights saved by --save-ema (e.g. with --eval-steps 1000) and "
                         "add the result to --out under 'rescores'")
    ap.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from _machine import machine

    from symdiff.config import load_config, to_dict
    from symdiff.data.batch import collate
    from symdiff.models import build_model, count_params

    if args.rescore:
        return rescore(args)
    overrides = ["data.root=unused", *args.overrides] + ([f"model.kind={args.kind}"] if args.kind else [])
    cfg = load_config(args.config, overrides)
    kind = str(cfg.model.kind)
    out = Path(args.out or REPO / "benchmarks" / "results" / f"learning_curve_{kind}.json")
    mols, train_idx = load_qm9(Path(args.data))
    bs = args.batch_size or int(cfg.data.batch_size)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model = build_model(cfg)
    hist = np.bincount(mols.n_atoms[train_idx])
    model.set_n_atoms_histogram(hist)
    ema = copy.deepcopy(model).eval()
    params = list(model.parameters())
    ema_params = list(ema.parameters())
    opt = torch.optim.AdamW(params, lr=float(cfg.train.lr), amsgrad=bool(cfg.train.amsgrad),
                            weight_decay=float(cfg.train.weight_decay))
    decay = float(cfg.train.ema_decay)
    result = {"machine": machine(), "config": to_dict(cfg), "kind": kind, "params": count_params(model),
              "batch_size": bs, "threads": args.threads, "budget_min": args.budget_min,
              "goal": "atom stability >= 90% and molecule stability >= 40% within 2 hours of CPU training",
              "loss_curve": [], "evals": []}
    budget = args.budget_min * 60.0
    next_eval = args.eval_every_min * 60.0
    train_time, step, window = 0.0, 0, []
    perm, pos = rng.permutation(train_idx), 0
    while True:
        if pos + bs > len(perm):
            perm, pos = rng.permutation(train_idx), 0
        batch = collate(mols, perm[pos:pos + bs])
        pos += bs
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss, _ = model.training_loss(batch)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, float(cfg.train.clip_grad_norm))
        if torch.isfinite(gnorm):
            opt.step()
            with torch.no_grad():
                torch._foreach_mul_(ema_params, decay)
                torch._foreach_add_(ema_params, [p.detach() for p in params], alpha=1.0 - decay)
        train_time += time.perf_counter() - t
        step += 1
        window.append(float(loss.detach()))
        if step % 100 == 0:
            result["loss_curve"].append({"step": step, "train_min": train_time / 60, "loss": float(np.mean(window))})
            print(f"step {step} train {train_time / 60:.1f} min loss {np.mean(window):.4f}", flush=True)
            window = []
        done = train_time >= budget
        if train_time >= next_eval or done:
            ev = evaluate(ema, args.eval_samples, args.eval_steps, seed=1000 + len(result["evals"]))
            ev.update({"step": step, "train_min": train_time / 60, "load_average": list(os.getloadavg())})
            result["evals"].append(ev)
            print(json.dumps(ev), flush=True)
            write_json(out, result)
            if args.save_ema:
                Path(args.save_ema).parent.mkdir(parents=True, exist_ok=True)
                torch.save({"ema": ema.state_dict(), "step": step, "config": to_dict(cfg)}, args.save_ema + ".tmp")
                os.replace(args.save_ema + ".tmp", args.save_ema)
            next_eval += args.eval_every_min * 60.0
        if done:
            break
    result["steps"] = step
    result["train_s_per_step"] = train_time / step
    write_json(out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
