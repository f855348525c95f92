"""Training and sampling speed of the SymDiff model on this machine's CPU (a loop over the model's own calls).

Measured on real QM9 training batches (EDM split, seeded), identical for every config. This script gives no ratio
against the official code: a ratio counts only when both sides ran in the same run on the same machine, which is
what benchmarks/bench_side_by_side.py does (the official harness and `symdiff train`, interleaved).

A training step is the full step: loss, backward, global-norm clip 2.0, AdamW(amsgrad) and the EMA update.
Sampling is timed per reverse step on batches of 100 and scaled to 1,001 network calls (1,000 steps plus the
final p(x, h | z_0) call). Two batchings: 'sorted' is what `symdiff sample` does (sizes drawn from p(N), sorted,
cut into batches of 100: every batch pads only to its own largest molecule), 'unsorted' pads each batch of 100
i.i.d. sizes to its largest (about 29 atoms, the official code's padding).

The machines are shared: wall times move with other people's load. Each entry also records the CPU seconds the
process used (all threads together), which moves much less; the load average at start and end is recorded.

Usage: .venv/bin/python benchmarks/bench_model_speed.py [--configs qm9_symdiff_s qm9_symdiff_l] [--threads 2]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import socket
import sys
import time
from pathlib import Path

# OMP_WAIT_POLICY is left to the runtime's default, as the official code gets it: forcing PASSIVE cost about 20%
# on an idle machine (../shared/peers/symdiff_official/README.md, 2026-12-01). The OpenMP runtime reads it when torch
# loads, before symdiff's own default (symdiff/__init__.py) is set, so record the value in force now.
OMP_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY", "unset (runtime default)")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def qm9_batches(data: Path, n_batches: int, batch_size: int, seed: int):
    from symdiff.data.batch import collate
    from symdiff.data.molecules import MoleculeSet

    d = np.load(data)
    mols = MoleculeSet(atomic_numbers=d["atomic_numbers"], positions=d["positions"], offsets=d["offsets"],
                       mol_ids=d["mol_id"].astype(np.int64))
    train = np.nonzero(d["split_edm"] == 0)[0]
    rng = np.random.default_rng(seed)
    return [collate(mols, rng.choice(train, batch_size, replace=False)) for _ in range(n_batches)]


def bench_train(model: torch.nn.Module, batches, warmup: int) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, amsgrad=True, weight_decay=1e-12)
    params = [p for p in model.parameters()]
    ema = [p.detach().clone() for p in params]
    model.train()

    def step(b):
        opt.zero_grad(set_to_none=True)
        loss, _ = model.training_loss(b)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 2.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_mul_(ema, 0.9999)
            torch._foreach_add_(ema, [p.detach() for p in params], alpha=1e-4)

    for b in batches[:warmup]:
        step(b)
    times, cpu = [], time.process_time()
    for b in batches[warmup:]:
        t = time.perf_counter()
        step(b)
        times.append(time.perf_counter() - t)
    cpu = time.process_time() - cpu
    n = len(times)
    bs = len(batches[0])
    return {"batch_size": bs, "steps_timed": n, "s_per_step_median": float(np.median(times)),
            "s_per_step_mean": float(np.mean(times)), "mol_per_s": bs / float(np.median(times)),
            "cpu_s_per_step": cpu / n,
            "atoms_per_batch_mean": float(np.mean([float(b.mask.sum()) for b in batches[warmup:]])),
            "padding_fraction_mean": float(np.mean([b.padding_fraction for b in batches[warmup:]]))}


@torch.no_grad()
def bench_sample(model, batch_size: int, steps_per_batch: int, n_batches: int, sorted_sizes: bool, seed: int) -> dict:
    model.eval()
    torch.manual_seed(seed)
    if sorted_sizes:
        # What `symdiff sample` does for 10,000 molecules: sort all sizes, cut into batches; time batches spread
        # over the size range so the mean is that of the whole run.
        sizes = np.sort(model.sample_n_atoms(100 * batch_size).numpy())
        picks = np.linspace(0, 99, n_batches).round().astype(int)
        size_sets = [sizes[i * batch_size:(i + 1) * batch_size] for i in picks]
    else:
        size_sets = [model.sample_n_atoms(batch_size).numpy() for _ in range(n_batches)]
    per_step = []
    model.sample(torch.as_tensor(size_sets[0]), steps=1)  # warm-up
    cpu = time.process_time()
    for s in size_sets:
        t = time.perf_counter()
        model.sample(torch.as_tensor(s), steps=steps_per_batch)
        per_step.append((time.perf_counter() - t) / (steps_per_batch + 1))
    cpu_call = (time.process_time() - cpu) / (len(size_sets) * (steps_per_batch + 1))
    step_s = float(np.mean(per_step))
    return {"batch_size": batch_size, "s_per_network_call": step_s,
            "s_per_molecule_1000_steps": step_s * 1001 / batch_size,
            "cpu_s_per_network_call": cpu_call, "cpu_s_per_molecule_1000_steps": cpu_call * 1001 / batch_size,
            "padded_atoms_per_batch_mean": float(np.mean([batch_size * s.max() for s in size_sets])),
            "real_atoms_per_batch_mean": float(np.mean([s.sum() for s in size_sets]))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["qm9_symdiff_s", "qm9_symdiff_l"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--train-steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--sample-batches", type=int, default=4)
    ap.add_argument("--sample-steps", type=int, default=4)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "qm9" / "qm9.npz"))
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--linear-backend", default="auto", help="model.linear_backend: auto (oneDNN on CPU) | aten")
    ap.add_argument("--baseline-aten", action="store_true",
                    help="also time training with model.linear_backend=aten (torch's own BLAS) in the same run")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "model_speed.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(REPO))
    from symdiff.config import load_config
    from symdiff.models import build_model, count_params

    batches = qm9_batches(Path(args.data), args.warmup + args.train_steps, args.batch_size, seed=0)
    result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": {"host": socket.gethostname(), "cpu": cpu_name(), "cores": os.cpu_count(),
                          "threads": args.threads, "omp_wait_policy": OMP_WAIT_POLICY,
                          "torch": torch.__version__, "python": platform.python_version(),
                          "load_average_start": list(os.getloadavg())},
              "configs": {}}
    for name in args.configs:
        cfg = load_config(REPO / "configs" / f"{name}.yaml", [f"model.kernel_backend={args.backend}",
                                                              f"model.linear_backend={args.linear_backend}"])
        entry = {"linear_backend": args.linear_backend}
        if args.baseline_aten:
            torch.manual_seed(0)
            base = build_model(load_config(REPO / "configs" / f"{name}.yaml",
                                           [f"model.kernel_backend={args.backend}", "model.linear_backend=aten"]))
            entry["train_linear_aten"] = bench_train(base, batches, args.warmup)
            print(f"{name}: train (linear aten) {entry['train_linear_aten']['s_per_step_median']:.3f} s/step, "
                  f"{entry['train_linear_aten']['mol_per_s']:.1f} mol/s", flush=True)
            del base
        torch.manual_seed(0)
        model = build_model(cfg)
        entry["params"] = count_params(model)
        entry["train"] = bench_train(model, batches, args.warmup)
        print(f"{name}: train {entry['train']['s_per_step_median']:.3f} s/step, "
              f"{entry['train']['mol_per_s']:.1f} mol/s", flush=True)
        for mode in ("sorted", "unsorted"):
            entry[f"sample_{mode}"] = bench_sample(model, 100, args.sample_steps, args.sample_batches,
                                                   mode == "sorted", seed=1)
            print(f"{name}: sample ({mode}) {entry[f'sample_{mode}']['s_per_molecule_1000_steps']:.2f} s/molecule",
                  flush=True)
        if args.baseline_aten:
            entry["speedup_train_vs_linear_aten"] = (entry["train"]["mol_per_s"]
                                                     / entry["train_linear_aten"]["mol_per_s"])
            entry["speedup_train_cpu_s_vs_linear_aten"] = (entry["train_linear_aten"]["cpu_s_per_step"]
                                                           / entry["train"]["cpu_s_per_step"])
        result["configs"][name] = entry
    result["machine"]["load_average_end"] = list(os.getloadavg())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk.startswith("speedup")}
                      for k, v in result["configs"].items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
