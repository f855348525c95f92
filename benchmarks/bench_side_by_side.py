"""Training speed of the product against the official SymDiff code, side by side: one run, one machine.

A figure quoted from another machine or another day is no baseline (the shared machines differ by up to 1.5x), so
this script interleaves the two in one run, under the same load:

* the official code, through its own harness (``../shared/peers/symdiff_official/harness.py``), run as a
  subprocess exactly as that directory's README says (read-only directory: ``PYTHONDONTWRITEBYTECODE=1``;
  ``QM9_NPZ``, ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``); it times its own training step (loss, backward,
  clipping, AdamW amsgrad, EMA) on random real QM9 batches;
* the product, through ``symdiff train`` on real QM9 shards built by ``symdiff data build`` from
  ``../shared/data/qm9/qm9.npz``; it/s and molecules/s are read from the run's ``metrics.jsonl``
  (``train.log_every=1``) after dropping the warm-up steps. This measures the product, not a parallel loop.

Each pass runs every config on both sides, the order alternating from pass to pass; the figures are medians over
passes of each side's per-pass median. The harness waits for an idle machine before every step (up to 30 minutes;
``--max_seconds`` ends its timing only once 3 undisturbed steps exist) and drops steps that other processes
disturbed. The product cannot wait, so this script records, for every product step, the share of the machine
other processes used during it (/proc/stat less the product's own process tree) and reports the medians over all
timed steps and over the undisturbed ones (<= 5%, the harness's threshold). On a machine that others keep busy,
``--no-idle-wait`` runs the same harness without the wait and the dropping, so that both sides are timed under the
same load; the ratio then holds for that load and the absolute figures are lower bounds. Pass the same
``--omp-wait-policy`` to both sides there (spinning OpenMP threads on an oversubscribed machine measure the
scheduler). The load average before and after each run, the commit and the thread settings are stored with the
result.

The harness's ``edm_plus`` (EDM's own EGNN) is paired with the product's ``qm9_edm_s`` (kind egnn, same size).

Usage: .venv/bin/python benchmarks/bench_side_by_side.py [--configs symdiff_plus symdiff_ppp edm_plus] [--passes 3]
       [--steps 15] [--warmup 3] [--threads 2] [--no-idle-wait] [--omp-wait-policy default|PASSIVE|ACTIVE]
       [--merge] [--out benchmarks/results/side_by_side_DATE.json]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
PEER = REPO.parent / "shared" / "peers" / "symdiff_official"
QM9_NPZ = REPO.parent / "shared" / "data" / "qm9" / "qm9.npz"
# harness config -> the project's config of the same architecture (SPEC §3.5)
PROJECT_CONFIG = {"symdiff_plus": "qm9_symdiff_s", "symdiff_ppp": "qm9_symdiff_l",
                  # EDM's EGNN, nf 256 x 9 (5,339,920 parameters on both sides; tests/test_egnn.py)
                  "edm_plus": "qm9_edm_s"}
FOREIGN_MAX = 0.05  # the harness's own threshold: a step is disturbed when others used > 5% of the machine
# --no-idle-wait: the same harness, imported and run unchanged except that it neither waits for an idle machine
# nor drops disturbed steps, so that both sides are timed under the same load (the product cannot wait either).
# Every step's foreign_cpu is still recorded by the harness itself.
NO_IDLE_WAIT = ("import sys, harness; harness.wait_idle = lambda *a, **k: 0.0; harness.FOREIGN_MAX = float('inf'); "
                "sys.argv[0] = 'harness.py'; harness.main()")


def thread_env(threads: int, wait_policy: str) -> dict:
    """The same threads and OpenMP wait policy for both sides. 'default' leaves OMP_WAIT_POLICY unset: the official
    code then gets the runtime's default, the product its own (the symdiff package sets PASSIVE when unset), so
    a ratio taken that way mixes the code with the policy; on a loaded machine pass the same policy to both."""
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if wait_policy != "default":
        env["OMP_WAIT_POLICY"] = wait_policy
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


class CpuMonitor:
    """Samples (time, machine busy jiffies, jiffies of one process tree) so that any interval can be judged."""

    def __init__(self, pid: int, period: float = 0.1):
        import psutil

        self.root, self.period, self.samples = psutil.Process(pid), period, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _tree_jiffies(self) -> float:
        import psutil

        total = 0.0
        for p in [self.root, *self.root.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                busy = sum(getattr(psutil.cpu_times(), k, 0.0) for k in
                           ("user", "nice", "system", "irq", "softirq", "steal"))
                self.samples.append((time.time(), busy, self._tree_jiffies()))
            except psutil.Error:
                break
            self._stop.wait(self.period)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def foreign(self, t0: float, t1: float) -> float | None:
        """Share of the machine's capacity other processes used in [t0, t1] (nearest samples); None if unknown."""
        inside = [s for s in self.samples if t0 - self.period <= s[0] <= t1 + self.period]
        if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
            return None
        (a, b) = (inside[0], inside[-1])
        wall = b[0] - a[0]
        return max(0.0, ((b[1] - a[1]) - (b[2] - a[2])) / (wall * (os.cpu_count() or 1)))


def run_official(config: str, args, work: Path, tag: str) -> dict:
    out = work / f"official_{config}_{tag}.json"
    py = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable
    env = thread_env(args.threads, args.omp_wait_policy)
    env.update(PYTHONDONTWRITEBYTECODE="1", QM9_NPZ="../../data/qm9/qm9.npz")
    flags = ["--config", config, "--mode", "train", "--batch", str(args.batch), "--warmup", str(args.warmup),
             "--steps", str(args.steps), "--max_seconds", str(args.max_seconds), "--out", str(out)]
    cmd = [py, "harness.py", *flags] if not args.no_idle_wait else [py, "-c", NO_IDLE_WAIT, *flags]
    load0, t0 = loadavg(), time.time()
    res = subprocess.run(cmd, cwd=PEER, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"official {config} failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    r = json.loads(out.read_text())
    timed = [s for s in r["steps"] if not s["warmup"] and not s["contended"]]
    clean = [s["total"] for s in timed if s["foreign_cpu"] <= FOREIGN_MAX]
    return {"molecules_per_s": r["molecules_per_s"], "it_per_s": 1.0 / r["step_time"]["median"],
            "s_per_step_median": r["step_time"]["median"], "steps_timed": len(timed),
            "step_s": [s["total"] for s in timed], "step_foreign_cpu": [s["foreign_cpu"] for s in timed],
            "undisturbed": {"steps": len(clean),
                            "molecules_per_s": args.batch / statistics.median(clean) if clean else None},
            "steps_discarded_contended": r["n_discarded_contended"], "waited_idle_s": r["waited_idle_s"],
            "mean_foreign_cpu": r["mean_foreign_cpu"], "threads": r["threads"], "params": r["params"],
            "nmax_mean": r["nmax_mean"], "wall_s": time.time() - t0, "load_average_before": load0,
            "load_average_after": loadavg()}


def build_shards(work: Path) -> Path:
    shards = work / "qm9_shards"
    cmd = [sys.executable, "-m", "symdiff.cli", "data", "build", "--dataset", "qm9", "--source", str(QM9_NPZ),
           "--out", str(shards)]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"symdiff data build failed:\n{res.stderr[-3000:]}")
    return shards


def run_project(config: str, args, shards: Path, work: Path, tag: str) -> dict:
    run_dir = work / f"project_{config}_{tag}"
    steps = args.warmup + args.steps
    cmd = [sys.executable, "-m", "symdiff.cli", "train", "--config", str(REPO / "configs" / f"{config}.yaml"),
           "--run-dir", str(run_dir), "--resume", "never", f"data.root={shards}", f"data.batch_size={args.batch}",
           f"train.max_steps={steps}", "train.log_every=1", f"train.ckpt_every={100 * steps}"]
    env = thread_env(args.threads, args.omp_wait_policy)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    load0, t0 = loadavg(), time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    mon = CpuMonitor(proc.pid)
    stdout, stderr = proc.communicate()
    mon.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"symdiff train {config} failed:\n{stderr[-3000:]}")
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    timed = rows[args.warmup:]
    for prev, row in zip(rows[args.warmup - 1:], timed):
        row["foreign_cpu"] = mon.foreign(prev["time"], row["time"])
    clean = [r for r in timed if r["foreign_cpu"] is not None and r["foreign_cpu"] <= FOREIGN_MAX]
    return {"it_per_s": statistics.median(r["it_per_s"] for r in timed),
            "molecules_per_s": statistics.median(r["molecules_per_s"] for r in timed),
            "steps_timed": len(timed), "step_s": [1.0 / r["it_per_s"] for r in timed],
            "step_foreign_cpu": [r["foreign_cpu"] for r in timed],
            "undisturbed": {"steps": len(clean),
                            "it_per_s": statistics.median(r["it_per_s"] for r in clean) if clean else None,
                            "molecules_per_s": (statistics.median(r["molecules_per_s"] for r in clean)
                                                if clean else None)},
            "mean_foreign_cpu": statistics.fmean(r["foreign_cpu"] for r in timed if r["foreign_cpu"] is not None),
            "padding_fraction_mean": statistics.fmean(r["padding_fraction"] for r in timed),
            "tokens_per_step_mean": statistics.fmean(r["tokens_per_s"] / r["it_per_s"] for r in timed),
            "final_loss": rows[-1]["loss"], "wall_s": time.time() - t0, "load_average_before": load0,
            "load_average_after": loadavg()}


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def summarise(official: list[dict], project: list[dict]) -> dict:
    out = {"official_molecules_per_s": median_of(official, "molecules_per_s"),
           "project_molecules_per_s": median_of(project, "molecules_per_s"),
           "official_it_per_s": median_of(official, "it_per_s"), "project_it_per_s": median_of(project, "it_per_s")}
    out["ratio_project_over_official"] = out["project_molecules_per_s"] / out["official_molecules_per_s"]
    # The same, over the steps no other process disturbed (<= 5% of the machine), where both sides have some.
    und = {side: [r["undisturbed"]["molecules_per_s"] for r in runs if r["undisturbed"]["molecules_per_s"]]
           for side, runs in (("official", official), ("project", project))}
    if und["official"] and und["project"]:
        out["undisturbed_steps"] = {"official_molecules_per_s": statistics.median(und["official"]),
                                    "project_molecules_per_s": statistics.median(und["project"]),
                                    "passes_with_such_steps": [len(und["official"]), len(und["project"])]}
        out["undisturbed_steps"]["ratio_project_over_official"] = (statistics.median(und["project"])
                                                                   / statistics.median(und["official"]))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["symdiff_plus", "symdiff_ppp"], choices=sorted(PROJECT_CONFIG))
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-seconds", type=float, default=300.0,
                    help="the harness's --max_seconds: it stops (after >= 3 undisturbed steps) once this is spent")
    ap.add_argument("--no-idle-wait", action="store_true",
                    help="run the harness without its idle wait and step discarding (a machine others are using: "
                         "both sides then run under the same load; absolute figures are lower bounds)")
    ap.add_argument("--omp-wait-policy", default="default", choices=["default", "PASSIVE", "ACTIVE"],
                    help="OMP_WAIT_POLICY for both sides (see thread_env)")
    ap.add_argument("--merge", action="store_true",
                    help="add these configs to an existing --out file (each merged config records its own run)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from _machine import git_commit, machine

    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    out = Path(args.out or REPO / "benchmarks" / "results" / f"side_by_side_{date}.json")
    result = {"benchmark": "bench_side_by_side", "commit": git_commit(), "machine": machine(),
              "threads": {"OMP_NUM_THREADS": args.threads, "MKL_NUM_THREADS": args.threads,
                          "OMP_WAIT_POLICY": (args.omp_wait_policy if args.omp_wait_policy != "default" else
                                              "unset: official runtime default, product PASSIVE (package)")},
              "batch": args.batch, "warmup_steps": args.warmup, "timed_steps": args.steps, "passes": args.passes,
              "data": "full QM9 (../shared/data/qm9/qm9.npz), EDM train split; official: its random batches; "
                      "project: `symdiff data build` shards, batches of B molecules (no token budget), each "
                      "padded to its largest molecule as the official batches are",
              "official_idle_wait": not args.no_idle_wait,
              "official_command": "PYTHONDONTWRITEBYTECODE=1 QM9_NPZ=../../data/qm9/qm9.npz OMP_NUM_THREADS=T "
                                  "MKL_NUM_THREADS=T python harness.py --config C --mode train --batch B "
                                  "--warmup W --steps S --max_seconds M --out X (cwd ../shared/peers/symdiff_official)",
              "configs": {}}
    this_run = {k: result[k] for k in ("commit", "machine", "threads", "official_idle_wait")}
    if args.merge and out.exists():
        result = json.loads(out.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shards = build_shards(work)
        runs = {c: {"official": [], "project": []} for c in args.configs}
        for p in range(args.passes):
            for c in args.configs:
                order = ["official", "project"] if p % 2 == 0 else ["project", "official"]
                for side in order:
                    tag = f"pass{p}"
                    r = (run_official(c, args, work, tag) if side == "official"
                         else run_project(PROJECT_CONFIG[c], args, shards, work, tag))
                    r["pass"] = p
                    runs[c][side].append(r)
                    print(f"pass {p} {c:13s} {side:8s} {r['molecules_per_s']:7.1f} mol/s  "
                          f"(load {r['load_average_before'][0]:.2f} -> {r['load_average_after'][0]:.2f})", flush=True)
                result["configs"][c] = {"project_config": PROJECT_CONFIG[c], "run": this_run, **runs[c],
                                        "summary": summarise(runs[c]["official"], runs[c]["project"])}
                _write(out, result)  # after every pair: an interrupted run keeps what it measured
    this_run["load_average_end"] = loadavg()
    _write(out, result)
    print(json.dumps({c: v["summary"] for c, v in result["configs"].items()}, indent=1))
    print(f"wrote {out}")
    return 0


def _write(out: Path, result: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out)


if __name__ == "__main__":
    sys.exit(main())
