"""The GPU suite: every GPU figure of issue #16 in one command, each section time-boxed (tools/gpu_suite.sh).

    tools/gpu_suite.sh                              # on the GPU machine: about 8 minutes on one H100/H200
    tools/gpu_suite.sh --cpu-smoke --out DIR        # the same code path at tiny sizes on CPU (CI runs it)
    bash tools/gpu_suite.sh --out $OUT              # through the device tool, with .whl carried (gpu_wheels.sh)

Sections, in order; a failure or a time-out in one is recorded and the next still runs:
- environment: GPU, driver, torch, triton, CUDA, cuDNN, DeepSpeed versions, measured copy bandwidth and bf16 matmul;
- kernels: tests/test_kernels_*.py with the fused ops on the device (tests/kernel_device.py) in float32 and bf16,
  then ``symdiff profile`` at QM9 and GEOM sizes (fused vs eager vs torch.compile, forward and backward, fraction
  of the measured copy bandwidth);
- training: ``symdiff train`` at batch 256, bf16, one device, SymDiff+ and SymDiff+++ on QM9 and SymDiff+++ on
  GEOM-sized data; it/s, molecules/s, tokens/s, peak memory and MFU (torch's FLOP counter on real batches);
- resume: ZeRO-2 stopped at half-way and resumed against the uninterrupted run, and a second uninterrupted run as
  the floor of run-to-run noise (bf16 and atomics on a GPU; bitwise on CPU in float32);
- sampling: ``symdiff sample`` of QM9 molecules from SymDiff+++ with the 100-step and the 1000-step samplers,
  seconds per molecule, scored by ``symdiff eval`` (the weights are those of the short training run: about random).

It measures the product through its command line in subprocesses (as the other benchmarks here do), which is why it
lives in benchmarks/ beside them and their machine record (_machine.py) rather than in the package. It writes
``gpu_suite_<device>_<date>.json`` (top level: device, date, commit, and the sections) and a readable ``.md``.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
SECTIONS = ("environment", "kernels", "training", "resume", "sampling")
# Dense bf16 tensor-core peaks from NVIDIA's datasheets (SXM parts), for MFU; the measured matmul is reported beside.
DATASHEET_BF16_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0}
PAPER_IT_PER_S = {"qm9_symdiff_l": 14.32, "geom_symdiff_l": 7.72}  # SPEC §5.4 (Table 3), one GPU, batch 256
TINY_MODEL = ["model.hidden_size=32", "model.depth=1", "model.num_heads=2", "model.xh_hidden_size=16",
              "model.num_gaussians=16", "model.gamma_hidden_size=16", "model.gamma_depth=1",
              "model.gamma_num_heads=2", "model.gamma_dec_hidden=16"]
# GEOM-sized synthetic molecules: element shares close to GEOM-Drugs' (H and C dominate), random-walk geometry.
GEOM_LIKE_ELEMENTS = ((1, 0.46), (6, 0.40), (7, 0.06), (8, 0.06), (9, 0.01), (16, 0.007), (17, 0.003))


@dataclass
class Plan:
    """Sizes of one suite run: the GPU figures, or the same path at tiny sizes (--cpu-smoke)."""

    smoke: bool
    boxes: dict[str, float]  # section -> seconds
    kernel_tests: list[str]
    kernel_test_filter: Optional[str]
    kernel_dtypes: tuple[str, ...] = ("float32", "bfloat16")
    profile_args: list[str] = field(default_factory=list)
    profile_kernels: tuple[str, ...] = ("gaussian", "com", "qr")
    attention_shapes: tuple[tuple[str, int], ...] = (("qm9", 256), ("geom", 64))  # (size histogram, molecules)
    attention_width: tuple[int, int, int] = (384, 6, 2)  # hidden, heads, blocks (SymDiff+++'s width)
    train_cases: list[tuple[str, str, str]] = field(default_factory=list)  # (label, config, data)
    train_batch: int = 256
    train_steps: int = 160
    train_warmup: int = 20
    train_log_every: int = 10
    precision: str = "bf16"
    model_overrides: list[str] = field(default_factory=list)
    resume_config: str = "qm9_symdiff_s"
    resume_batch: int = 64
    resume_steps: int = 40
    resume_precision: str = "bf16"
    resume_noise_run: bool = True  # a second uninterrupted run: the floor of run-to-run noise (not needed when exact)
    sample_config: str = "qm9_symdiff_l"
    sample_n: int = 10_000
    sample_batch: int = 5_000
    samplers: tuple[tuple[str, int], ...] = (("dpmpp2m", 100), ("ancestral", 1000))
    geom_like_conformers: int = 4000


def gpu_plan() -> Plan:
    tests = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_kernels_*.py"))
    return Plan(smoke=False,
                boxes={"environment": 15, "kernels": 170, "training": 135, "resume": 60, "sampling": 100},
                kernel_tests=tests, kernel_test_filter=None,
                profile_args=["--shapes", "qm9,geom,stream", "--rep-ms", "50"],
                train_cases=[("SymDiff+ QM9", "qm9_symdiff_s", "qm9"), ("SymDiff+++ QM9", "qm9_symdiff_l", "qm9"),
                             ("SymDiff+++ GEOM-sized", "geom_symdiff_l", "geom_like")])


def smoke_plan() -> Plan:
    return Plan(smoke=True,
                boxes={"environment": 30, "kernels": 60, "training": 90, "resume": 90, "sampling": 60},
                kernel_tests=["tests/test_kernels_com.py"], kernel_test_filter="test_padded_matches and 3-7",
                kernel_dtypes=("bfloat16",),
                profile_args=["--device", "cpu", "--shapes", "qm9", "--batch", "4", "--atoms", "6", "--no-compile",
                              "--min-run-time", "0.01"], profile_kernels=("com",),
                attention_shapes=(("qm9", 4), ("geom", 2)), attention_width=(32, 2, 1),
                train_cases=[("SymDiff+++ QM9 (tiny)", "qm9_symdiff_l", "qm9"),
                             ("SymDiff+++ GEOM-sized (tiny)", "geom_symdiff_l", "geom_like")],
                train_batch=8, train_steps=4, train_warmup=1, train_log_every=1, model_overrides=TINY_MODEL,
                resume_config="qm9_symdiff_s", resume_batch=8, resume_steps=4, resume_precision="fp32",
                resume_noise_run=False,
                sample_config="qm9_symdiff_l", sample_n=6, sample_batch=6, samplers=(("dpmpp2m", 3), ("ancestral", 5)),
                geom_like_conformers=60)


# --------------------------------------------------------------------------------------------- running things


class SectionTimeout(Exception):
    pass


class Box:
    """A section's time box: every command it runs gets what is left of it."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


@dataclass
class Ctx:
    plan: Plan
    work: Path  # scratch: data, runs, samples, logs
    out_dir: Path
    env: dict[str, str]
    device: str  # "cuda" or "cpu"
    notes: list[str] = field(default_factory=list)
    shared: dict[str, Any] = field(default_factory=dict)  # between sections: data roots, the sampling run


def run_cmd(ctx: Ctx, box: Box, cmd: list[str], name: str, cwd: Optional[Path] = None,
            env: Optional[dict[str, str]] = None, limit: Optional[float] = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` inside the box (and ``limit`` seconds); its output goes to work/logs/NAME.log. Raises
    SectionTimeout when the box runs out, RuntimeError (with the log's tail) on a non-zero exit."""
    left = box.left() if limit is None else min(box.left(), limit)
    if left <= 1:
        raise SectionTimeout(f"no time left for {name}")
    log = ctx.work / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        try:
            res = subprocess.run(cmd, cwd=str(cwd or ctx.work), env=env or ctx.env, stdout=fh,
                                 stderr=subprocess.STDOUT, text=True, timeout=left)
        except subprocess.TimeoutExpired:
            raise SectionTimeout(f"{name} ran past its {left:.0f} s") from None
    res.stdout = log.read_text(errors="replace")
    if res.returncode != 0:
        raise RuntimeError(f"{name} exited {res.returncode}: {res.stdout[-1500:]}")
    return res


def cli(*args: str) -> list[str]:
    # -P: the checkout itself must not shadow the installed package (on the GPU machine it lacks symdiff.kernels)
    return [sys.executable, "-P", "-m", "symdiff.cli", *args]


def run_section(name: str, fn: Callable[[Ctx, Box], dict], ctx: Ctx) -> dict:
    box = Box(ctx.plan.boxes[name])
    t0 = time.monotonic()
    print(f"== {name} (box {ctx.plan.boxes[name]:.0f} s)", flush=True)
    try:
        res = fn(ctx, box)
        res.setdefault("status", "ok")
    except SectionTimeout as exc:
        res = {"status": "timed_out", "error": str(exc), **ctx.shared.pop(f"partial_{name}", {})}
    except Exception as exc:  # one section's failure must not lose the others
        res = {"status": "error", "error": f"{type(exc).__name__}: {str(exc)[-2000:]}",
               **ctx.shared.pop(f"partial_{name}", {})}
    res["wall_s"] = round(time.monotonic() - t0, 1)
    res["box_s"] = ctx.plan.boxes[name]
    print(f"   {name}: {res['status']} in {res['wall_s']} s", flush=True)
    return res


# --------------------------------------------------------------------------------------------- environment


def _ceilings(device: str) -> dict[str, Any]:
    import torch

    dev = torch.device(device)
    n_copy = (1 << 28) if device == "cuda" else (1 << 22)
    n_mm = 8192 if device == "cuda" else 256
    src = torch.randn(n_copy, device=dev)
    dst = torch.empty_like(src)
    a = torch.randn(n_mm, n_mm, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n_mm, n_mm, device=dev, dtype=torch.bfloat16)

    def timed(fn: Callable[[], Any], reps: int) -> float:
        for _ in range(3):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / reps

    t_copy = timed(lambda: dst.copy_(src), 20)
    t_mm = timed(lambda: a @ b, 10 if device == "cuda" else 2)
    return {"copy_GBps": 2 * n_copy * 4 / t_copy / 1e9, "copy_bytes": n_copy * 4,
            "matmul_bf16_TFLOPs": 2 * n_mm ** 3 / t_mm / 1e12, "matmul_n": n_mm,
            "method": "mean of timed repeats after 3 warm-ups; copy counts bytes read + written"}


def _version(mod: str) -> Optional[str]:
    try:
        return __import__(mod).__version__
    except Exception:  # a missing or broken package is a finding, not a crash
        return None


def section_environment(ctx: Ctx, box: Box) -> dict:
    import torch

    from _machine import machine

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "torch_cuda": torch.version.cuda, "triton": _version("triton"),
                           "deepspeed": _version("deepspeed"), "rdkit": _version("rdkit"), "h5py": _version("h5py"),
                           "omegaconf": _version("omegaconf"), "numpy": _version("numpy"),
                           "host": socket.gethostname(), "machine": machine(), "device_kind": ctx.device}
    if ctx.device == "cuda":
        p = torch.cuda.get_device_properties(0)
        env.update({"gpu": torch.cuda.get_device_name(0), "gpu_count": torch.cuda.device_count(),
                    "gpu_memory_gib": round(p.total_memory / 2**30, 1), "sm_count": p.multi_processor_count,
                    "capability": f"{p.major}.{p.minor}", "cudnn": torch.backends.cudnn.version()})
        smi = shutil.which("nvidia-smi")
        if smi:
            q = subprocess.run([smi, "--query-gpu=name,driver_version,clocks.max.sm,memory.total",
                                "--format=csv,noheader"], capture_output=True, text=True, timeout=max(1, box.left()))
            env["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
    env["ceilings"] = _ceilings(ctx.device)
    ctx.shared["ceilings"] = env["ceilings"]
    return env


# --------------------------------------------------------------------------------------------- kernels


def _junit(path: Path) -> dict[str, Any]:
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    return {"tests": int(suite.get("tests", 0)), "failures": int(suite.get("failures", 0)),
            "errors": int(suite.get("errors", 0)), "skipped": int(suite.get("skipped", 0)),
            "passed": int(suite.get("tests", 0)) - int(suite.get("failures", 0)) - int(suite.get("errors", 0))
            - int(suite.get("skipped", 0)), "failed_tests": failed[:50], "time_s": float(suite.get("time", 0))}


def section_kernels(ctx: Ctx, box: Box) -> dict:
    p = ctx.plan
    out: dict[str, Any] = {"tests": {}, "tolerances": "float32: the tests' own; bfloat16: assert_close at "
                           "rtol>=1.6e-2, atol>=1e-5 (tests/kernel_device.py), plain float32 thresholds kept"}
    ctx.shared["partial_kernels"] = out
    env = dict(ctx.env)
    if ctx.device == "cuda":
        env["TRITON_INTERPRET"] = "0"  # the compiled kernels, not the emulator (conftest only sets a default)
    # each test pass gets at most 30% of what is left; the profile (compiles included) the remainder
    shares = {"float32": 0.3, "bfloat16": 0.3}
    for dtype in p.kernel_dtypes:
        xml = ctx.work / f"kernels_{dtype}.xml"
        cmd = [sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", *p.kernel_tests,
               "--kernel-device", ctx.device, "--kernel-dtype", dtype, f"--junitxml={xml}"]
        if p.kernel_test_filter:
            cmd += ["-k", p.kernel_test_filter]
        try:
            run_cmd(ctx, box, cmd, f"kernel_tests_{dtype}", cwd=REPO, env=env, limit=box.left() * shares[dtype])
        except RuntimeError:  # failing tests are a result; the junit file says which
            pass
        except SectionTimeout as exc:
            out["tests"][dtype] = {"status": "timed_out", "error": str(exc)}
            continue
        out["tests"][dtype] = _junit(xml) if xml.is_file() else {"status": "no junit report"}
    out["attention"] = attention_probe(ctx.device, p.attention_shapes, p.attention_width)
    # one profile run per kernel, so that a time-out keeps the kernels already measured
    out["profile"] = {"rows": [], "notes": []}
    for kernel in p.profile_kernels:
        prof = ctx.work / f"profile_{kernel}.json"
        run_cmd(ctx, box, cli("profile", "--kernels", kernel, "--json", str(prof), *p.profile_args),
                f"profile_{kernel}", env=env)
        rep = json.loads(prof.read_text())
        out["profile"]["ceilings"] = rep["ceilings"]
        out["profile"]["notes"] += rep["notes"]
        out["profile"]["rows"] += [_profile_row(r) for r in rep["results"]]
    return out


def attention_probe(device: str, shapes: tuple[tuple[str, int], ...], width: tuple[int, int, int],
                    reps: int = 10) -> dict[str, Any]:
    """DiT blocks forward + backward with padded (boolean mask) and varlen (jagged, no mask) attention on molecules
    of the dataset's sizes: time, agreement, and on CUDA which SDPA kernels ran (from the profiler's kernel names)."""
    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile

    from symdiff.models.dit import DiT, Packing, set_attention
    from symdiff.models.symdiff import GEOM_N_HIST, QM9_N_HIST

    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    hidden, heads, depth = width
    rows = []
    for name, B in shapes:
        hist = QM9_N_HIST if name == "qm9" else GEOM_N_HIST
        p = np.array(list(hist.values()), dtype=float)
        sizes = np.random.default_rng(0).choice(list(hist), size=B, p=p / p.sum())
        mask = torch.arange(int(sizes.max()))[None] < torch.as_tensor(sizes)[:, None]
        pk = Packing.from_mask(mask.to(device))
        torch.manual_seed(0)
        net = DiT(hidden, depth, heads, out_channels=8)
        with torch.no_grad():  # adaLN-Zero starts as the identity with a zero output: give every part a signal
            for w in net.parameters():
                w.add_(0.05 * torch.randn_like(w))
        net.to(device, dtype)
        x = torch.randn(int(mask.sum()), hidden, device=device, dtype=dtype, requires_grad=True)
        t = torch.rand(B, device=device)
        row: dict[str, Any] = {"shape": name, "B": B, "N_max": int(sizes.max()), "tokens": int(mask.sum()),
                               "padding_fraction": 1 - float(mask.float().mean()), "dtype": str(dtype)}
        outs = {}
        for impl in ("padded", "varlen"):
            set_attention(net, impl)

            def step() -> torch.Tensor:
                out = net(x, t, pk)
                out.float().square().mean().backward()
                return out

            for _ in range(2):
                outs[impl] = step().detach().float()
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(reps):
                step()
            if cuda:
                torch.cuda.synchronize()
            row[f"{impl}_fwd_bwd_ms"] = (time.perf_counter() - t0) / reps * 1e3
            if cuda:
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    step()
                    torch.cuda.synchronize()
                names = {e.key for e in prof.key_averages()}
                row[f"{impl}_attention_kernels"] = sorted(n[:80] for n in names if re.search(
                    r"flash|fmha|efficient|attention|softmax", n, re.I))[:8]
        row["varlen_speedup"] = row["padded_fwd_bwd_ms"] / row["varlen_fwd_bwd_ms"]
        row["max_abs_diff"] = float((outs["padded"] - outs["varlen"]).abs().max())
        rows.append(row)
    return {"what": f"DiT blocks (H={hidden}, {heads} heads, {depth} blocks) forward + backward, mean of {reps}",
            "rows": rows}


def _profile_row(r: dict) -> dict:
    row = {k: r[k] for k in ("kernel", "shape", "B", "N", "K", "mode", "memory_bound")}
    for name, m in r["variants"].items():
        if "median_ms" in m:
            row[name] = {k: m.get(k) for k in ("median_ms", "GBps", "frac_copy_bw", "speedup_vs_eager",
                                                "speedup_vs_compiled", "targets_met", "peak_MB")}
        else:
            row[name] = {"skipped": m.get("skipped")}
    return row


# --------------------------------------------------------------------------------------------- data


def _qm9_root(ctx: Ctx) -> Path:
    if "qm9_root" not in ctx.shared:
        from symdiff.data.bundled import bundled_root

        ctx.shared["qm9_root"] = bundled_root("qm9")  # built once into the user's cache ($SYMDIFF_CACHE)
    return ctx.shared["qm9_root"]


def write_geom_like(path: Path, n_conformers: int, seed: int = 0) -> dict[str, Any]:
    """GEOM-SIZED synthetic molecules in the geom npz layout: atom counts drawn from GEOM-Drugs' size histogram
    (EDM's, in symdiff.models.symdiff), elements at GEOM-like shares, random-walk positions. For throughput at GEOM
    sizes only: no chemistry, never a GEOM result."""
    import numpy as np

    from symdiff.models.symdiff import GEOM_N_HIST

    rng = np.random.default_rng(seed)
    sizes, counts = np.array(list(GEOM_N_HIST)), np.array(list(GEOM_N_HIST.values()), dtype=float)
    n = rng.choice(sizes, size=n_conformers, p=counts / counts.sum()).astype(np.int64)
    z_vals, z_p = zip(*GEOM_LIKE_ELEMENTS)
    total = int(n.sum())
    z = rng.choice(np.array(z_vals), size=total, p=np.array(z_p) / sum(z_p)).astype(np.int8)
    step = rng.normal(size=(total, 3))
    step *= 1.4 / np.linalg.norm(step, axis=1, keepdims=True)
    offsets = np.zeros(n_conformers + 1, dtype=np.int64)
    np.cumsum(n, out=offsets[1:])
    pos = np.concatenate([np.cumsum(step[a:b], axis=0) for a, b in zip(offsets[:-1], offsets[1:])]).astype(np.float32)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, synthetic=np.array(True), description=np.array("GEOM-sized synthetic (gpu_suite): random geometry"),
             mol_smiles=np.array([f"[synthetic {i}]" for i in range(n_conformers)]),
             conf_mol_index=np.arange(n_conformers, dtype=np.int32), conf_offsets=offsets,
             atomic_numbers=z, positions=pos, formal_charges=np.zeros(total, np.int8))
    tmp.replace(path)
    return {"conformers": n_conformers, "atoms_mean": float(n.mean()), "atoms_max": int(n.max())}


def _geom_root(ctx: Ctx, box: Box) -> Path:
    if "geom_root" not in ctx.shared:
        src = ctx.work / "data" / "geom_like.npz"
        src.parent.mkdir(parents=True, exist_ok=True)
        ctx.shared["geom_like"] = write_geom_like(src, ctx.plan.geom_like_conformers)
        root = ctx.work / "data" / "geom_like"
        run_cmd(ctx, box, cli("data", "build", "--dataset", "geom", "--source", str(src), "--out", str(root),
                              "--conformers", "1"), "geom_like_build")
        ctx.shared["geom_root"] = root
    return ctx.shared["geom_root"]


# --------------------------------------------------------------------------------------------- training


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []


def throughput(rows: list[dict], warmup: int) -> dict[str, Any]:
    """it/s, molecules/s and tokens/s over the logged steps after ``warmup`` (each row covers the steps since the
    one before; its window rates times its duration give what it did)."""
    base = [r for r in rows if r["step"] <= warmup]
    timed = [r for r in rows if r["step"] > warmup]
    if not base or not timed:
        raise RuntimeError(f"too few logged steps after the {warmup} warm-up steps ({len(rows)} rows)")
    span = timed[-1]["time"] - base[-1]["time"]
    steps = timed[-1]["step"] - base[-1]["step"]
    mols = toks = 0.0
    prev = base[-1]["step"]
    for r in timed:
        dur = (r["step"] - prev) / r["it_per_s"]
        mols += r["molecules_per_s"] * dur
        toks += r["tokens_per_s"] * dur
        prev = r["step"]
    return {"steps_timed": steps, "it_per_s": steps / span, "molecules_per_s": mols / span,
            "tokens_per_s": toks / span, "peak_memory_gb": max(r["memory_gb"] for r in rows),
            "padding_fraction": sum(r["padding_fraction"] for r in timed) / len(timed),
            "final_loss": timed[-1]["loss"], "skipped_steps": timed[-1].get("nonfinite_total", 0)}


def flops_per_token(ctx: Ctx, config: str, root: Path, n_batches: int = 3) -> dict[str, Any]:
    """Training FLOPs (forward + backward) per real atom of ``config``'s model, counted by torch's FlopCounterMode
    on real batches of the run's size (matmuls and attention; the small elementwise work is not counted)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from symdiff.config import load_config
    from symdiff.data.loader import ShardLoader
    from symdiff.models import build_model

    # padded attention: the flop counter does not follow jagged tensors; attention is a few % of the FLOPs here
    cfg = load_config(REPO / "configs" / f"{config}.yaml", [f"data.root={root}", *ctx.plan.model_overrides,
                                                            "model.attention=padded"])
    torch.manual_seed(0)
    model = build_model(cfg).to(ctx.device)
    loader = ShardLoader(root, cfg.data.train_split, batch_size=ctx.plan.train_batch, shuffle=True, seed=0)
    flops = tokens = 0
    for i, batch in enumerate(loader):
        if i == n_batches:
            break
        with FlopCounterMode(display=False) as fc:
            loss, _ = model.training_loss(batch.to(ctx.device))
            loss.backward()
        flops += fc.get_total_flops()
        tokens += int(batch.n_atoms.sum())
        model.zero_grad(set_to_none=True)
    del model
    return {"flops_per_token": flops / max(tokens, 1), "batches_counted": n_batches,
            "counted_in": "float32, padded attention (counts do not depend on the dtype; the padded attention "
                          "over-counts the varlen attention that trains on CUDA by its padded slots)"}


def _peak_bf16(env_gpu: Optional[str]) -> Optional[float]:
    for key in sorted(DATASHEET_BF16_TFLOPS, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if env_gpu and key in env_gpu:
            return DATASHEET_BF16_TFLOPS[key]
    return None


def _train_cmd(ctx: Ctx, config: str, root: Path, run_dir: Path, steps: int, batch: int, precision: str,
               extra: list[str] = ()) -> list[str]:
    p = ctx.plan
    return cli("train", "--config", str(REPO / "configs" / f"{config}.yaml"), "--run-dir", str(run_dir),
               f"data.root={root}", f"data.batch_size={batch}", f"train.max_steps={steps}",
               f"train.log_every={p.train_log_every}", f"train.ckpt_every={10 * steps}", f"train.precision={precision}",
               "train.eval_every=0", "data.verify=size", *p.model_overrides, *extra)


def section_training(ctx: Ctx, box: Box) -> dict:
    import torch

    p = ctx.plan
    out: dict[str, Any] = {"precision": p.precision, "batch": p.train_batch, "steps": p.train_steps,
                           "warmup_steps_dropped": p.train_warmup, "cases": []}
    ctx.shared["partial_training"] = out
    gpu = torch.cuda.get_device_name(0) if ctx.device == "cuda" else None
    peak = _peak_bf16(gpu)
    measured = ctx.shared.get("ceilings", {}).get("matmul_bf16_TFLOPs")
    for label, config, data in p.train_cases:
        case: dict[str, Any] = {"label": label, "config": config, "data": data}
        out["cases"].append(case)
        try:
            root = _qm9_root(ctx) if data == "qm9" else _geom_root(ctx, box)
            if data == "geom_like":
                case["data_note"] = ("GEOM-sized synthetic molecules (sizes from GEOM-Drugs' histogram, random "
                                     f"geometry): {ctx.shared['geom_like']}")
            run_dir = ctx.work / "runs" / f"train_{config}"
            t0 = time.monotonic()
            run_cmd(ctx, box, _train_cmd(ctx, config, root, run_dir, p.train_steps, p.train_batch, p.precision),
                    f"train_{config}")
            case["wall_s_with_startup"] = round(time.monotonic() - t0, 1)
            case.update(throughput(_metrics(run_dir), p.train_warmup))
            if config == p.sample_config:
                ctx.shared["sample_run"] = run_dir
            fl = flops_per_token(ctx, config, root)
            case.update(fl)
            achieved = fl["flops_per_token"] * case["tokens_per_s"] / 1e12
            case["achieved_TFLOPs"] = achieved
            case["mfu_vs_datasheet"] = achieved / peak if peak else None
            case["mfu_vs_measured_matmul"] = achieved / measured if measured else None
            if config in PAPER_IT_PER_S and not p.smoke:
                case["paper_it_per_s"] = PAPER_IT_PER_S[config]
                case["vs_paper"] = case["it_per_s"] / PAPER_IT_PER_S[config]
        except SectionTimeout:
            case["status"] = "timed_out"
            raise
        except Exception as exc:
            case["status"] = "error"
            case["error"] = f"{type(exc).__name__}: {str(exc)[-1500:]}"
    out["datasheet_bf16_TFLOPs"] = peak
    return out


# --------------------------------------------------------------------------------------------- resume


def compare_losses(a: list[dict], b: list[dict]) -> dict[str, Any]:
    """Per-step loss differences of two runs' metrics (steps both logged)."""
    la = {r["step"]: float(r["loss"]) for r in a}
    lb = {r["step"]: float(r["loss"]) for r in b}
    steps = sorted(set(la) & set(lb))
    if not steps:
        raise RuntimeError("the two runs logged no common step")
    d = [abs(la[s] - lb[s]) for s in steps]
    rel = [abs(la[s] - lb[s]) / max(abs(la[s]), 1e-12) for s in steps]
    return {"steps_compared": len(steps), "max_abs_diff": max(d), "max_rel_diff": max(rel),
            "bitwise_equal": all(la[s] == lb[s] for s in steps)}


def section_resume(ctx: Ctx, box: Box) -> dict:
    p = ctx.plan
    root = _qm9_root(ctx)
    half = p.resume_steps // 2
    runs = {k: ctx.work / "runs" / f"resume_{k}" for k in ("straight", "again", "stopped")}
    extra = ["train.zero_stage=2", "train.log_every=1"]
    # the two uninterrupted runs and the first half of the stopped one at once: three processes, one device
    procs = []
    from symdiff.train.launch import free_port

    todo = [("straight", p.resume_steps), ("stopped", half)]
    if p.resume_noise_run:
        todo.append(("again", p.resume_steps))
    for key, steps in todo:
        env = {**ctx.env, "MASTER_PORT": str(free_port())}
        cmd = _train_cmd(ctx, p.resume_config, root, runs[key], steps, p.resume_batch, p.resume_precision, extra)
        log = open(ctx.work / "logs" / f"resume_{key}.log", "w")
        procs.append((key, subprocess.Popen(cmd, cwd=ctx.work, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    try:
        for key, proc, log in procs:
            try:
                rc = proc.wait(timeout=max(1.0, box.left()))
            except subprocess.TimeoutExpired:
                raise SectionTimeout(f"resume run {key} ran past the box") from None
            if rc != 0:
                raise RuntimeError(f"resume run {key} exited {rc}: "
                                   f"{(ctx.work / 'logs' / f'resume_{key}.log').read_text()[-1500:]}")
    finally:
        for _, proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    run_cmd(ctx, box, _train_cmd(ctx, p.resume_config, root, runs["stopped"], p.resume_steps, p.resume_batch,
                                 p.resume_precision, extra), "resume_continued")
    straight = _metrics(runs["straight"])
    resumed = [r for r in _metrics(runs["stopped"]) if r["step"] > half]
    diff = compare_losses([r for r in straight if r["step"] > half], resumed)
    exact_expected = ctx.device == "cpu" and p.resume_precision == "fp32"
    noise = compare_losses(straight, _metrics(runs["again"])) if p.resume_noise_run else None
    # bf16 keeps 8 mantissa bits (relative rounding 2^-9 ~ 2e-3 per op) and atomics reorder float sums run to run,
    # so on a GPU a resumed run can only match as closely as two uninterrupted runs match each other.
    tol = 0.0 if exact_expected else max(3 * (noise or {"max_rel_diff": 0.0})["max_rel_diff"], 1e-2)
    return {"config": p.resume_config, "zero_stage": 2, "precision": p.resume_precision, "batch": p.resume_batch,
            "steps": p.resume_steps, "stopped_at": half, "resumed_vs_uninterrupted": diff,
            "uninterrupted_vs_uninterrupted": noise, "tolerance_rel": tol,
            "tolerance_reason": ("CPU float32: bitwise" if exact_expected else
                                 "max(3 x the run-to-run spread of two uninterrupted runs, 1e-2): bf16 rounding "
                                 "(2^-9 relative) and atomic-add reductions make GPU runs differ in the last bits, "
                                 "and those differences grow over steps"),
            "pass": diff["max_rel_diff"] <= tol}


# --------------------------------------------------------------------------------------------- sampling


def section_sampling(ctx: Ctx, box: Box) -> dict:
    p = ctx.plan
    out: dict[str, Any] = {"config": p.sample_config, "weights": "the training section's short run (or a 1-step "
                           "run): random for quality; the timings are what counts", "samplers": []}
    ctx.shared["partial_sampling"] = out
    root = _qm9_root(ctx)
    run = ctx.shared.get("sample_run")
    if run is None or not (run / "checkpoints").is_dir():
        run = ctx.work / "runs" / "sample_weights"
        run_cmd(ctx, box, _train_cmd(ctx, p.sample_config, root, run, 1, p.train_batch, p.precision), "sample_weights")
    per_mol = None
    for sampler, steps in p.samplers:
        n = p.sample_n
        if per_mol is not None and steps > 0:  # fit the longer sampler into what is left (leave a third to eval)
            fit = int(box.left() * 0.6 / (per_mol * steps))
            n = max(min(n, fit), min(p.sample_batch, p.sample_n) // 10, 1)
        entry: dict[str, Any] = {"sampler": sampler, "steps": steps, "n": n}
        out["samplers"].append(entry)
        samples = ctx.work / f"samples_{sampler}_{steps}.npz"
        t0 = time.monotonic()
        res = run_cmd(ctx, box, cli("sample", "--run", str(run), "--n", str(n), "--steps", str(steps), "--sampler",
                                    sampler, "--batch-size", str(min(p.sample_batch, n)), "--out", str(samples),
                                    "--no-progress", "--overwrite"), f"sample_{sampler}_{steps}")
        entry["wall_s_with_startup"] = round(time.monotonic() - t0, 1)
        m = re.search(r"in ([0-9.]+) s \(([0-9.]+) s/molecule", res.stdout)
        if m:
            entry["sampling_s"] = float(m.group(1))
            entry["s_per_molecule"] = float(m.group(1)) / n
            entry["s_for_10000"] = entry["s_per_molecule"] * 10_000
            # a tiny smoke batch can finish within the log's rounding: never divide by a zero time below
            per_mol = max(entry["s_per_molecule"], 1e-6) / steps
        if n < p.sample_n:
            entry["note"] = f"{n} of {p.sample_n} molecules to fit the section's time box; s/molecule is per molecule"
        scores = ctx.work / f"eval_{sampler}_{steps}.json"
        try:
            run_cmd(ctx, box, cli("eval", "--samples", str(samples), "--dataset", "qm9", "--data-root", str(root),
                                  "--json", str(scores), "--overwrite"), f"eval_{sampler}_{steps}")
            entry["eval"] = json.loads(scores.read_text())
        except (RuntimeError, SectionTimeout) as exc:
            entry["eval_error"] = str(exc)[-500:]
    return out


# --------------------------------------------------------------------------------------------- report


def _fmt(v: Any, spec: str = ".3g") -> str:
    return "-" if v is None else format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def table(rep: dict) -> list[str]:
    lines = [f"Device {rep['device']}, {rep['date']}, commit {rep['commit']}; "
             f"mode {'cpu-smoke (tiny sizes: not figures)' if rep['smoke'] else 'full'}.", ""]
    lines += ["| section | status | wall s / box s |", "|---|---|---|"]
    lines += [f"| {s} | {rep[s].get('status')} | {rep[s].get('wall_s')} / {rep[s].get('box_s')} |" for s in SECTIONS]
    k = rep["kernels"]
    for dtype, t in k.get("tests", {}).items():
        lines.append(f"\nkernel tests on the device, {dtype}: {t.get('passed', '-')} passed, "
                     f"{t.get('failures', '-')} failed, {t.get('errors', '-')} errors, {t.get('skipped', '-')} skipped"
                     + (f" ({t.get('status')})" if t.get("status") else ""))
    rows = k.get("profile", {}).get("rows", [])
    if rows:
        lines += ["", "| kernel | shape | mode | fused ms | x eager | x compile | % copy bw |",
                  "|---|---|---|---|---|---|---|"]
        for r in rows:
            f = r.get("triton", {})
            e = r.get("eager", {})
            lines.append(f"| {r['kernel']} | {r['shape']} | {r['mode']} | {_fmt(f.get('median_ms'))} "
                         f"(eager {_fmt(e.get('median_ms'))}) | {_fmt(f.get('speedup_vs_eager'))} | "
                         f"{_fmt(f.get('speedup_vs_compiled'))} | "
                         f"{_fmt(100 * f['frac_copy_bw'] if f.get('frac_copy_bw') else None)} |")
    cases = rep["training"].get("cases", [])
    if cases:
        lines += ["", "| training | it/s | molecules/s | tokens/s | peak GB | MFU (datasheet) | MFU (measured mm) |",
                  "|---|---|---|---|---|---|---|"]
        for c in cases:
            lines.append(f"| {c['label']} | {_fmt(c.get('it_per_s'))} | {_fmt(c.get('molecules_per_s'))} | "
                         f"{_fmt(c.get('tokens_per_s'))} | {_fmt(c.get('peak_memory_gb'))} | "
                         f"{_fmt(c.get('mfu_vs_datasheet'))} | {_fmt(c.get('mfu_vs_measured_matmul'))} |"
                         + (f" {c.get('status')}: {c.get('error', '')[:80]}" if c.get("status") else ""))
    r = rep["resume"]
    if "resumed_vs_uninterrupted" in r:
        lines.append(f"\nresume (ZeRO-2, {r['precision']}): max relative loss difference resumed vs uninterrupted "
                     f"{_fmt(r['resumed_vs_uninterrupted']['max_rel_diff'])}, two uninterrupted runs "
                     f"{_fmt((r['uninterrupted_vs_uninterrupted'] or {}).get('max_rel_diff'))}; "
                     f"tolerance {_fmt(r['tolerance_rel'])}: "
                     f"{'pass' if r['pass'] else 'FAIL'}")
    for s in rep["sampling"].get("samplers", []):
        ev = s.get("eval", {})
        lines.append(f"\nsampling {s['sampler']} {s['steps']} steps: {s['n']} molecules, "
                     f"{_fmt(s.get('s_per_molecule'))} s/molecule ({_fmt(s.get('s_for_10000'))} s per 10,000); "
                     f"eval keys: {', '.join(list(ev)[:6]) or s.get('eval_error', '-')}")
    return lines


def _commit() -> str:
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    stamp = REPO / ".whl" / "COMMIT"  # the working tree travels to the GPU machine without .git
    return stamp.read_text().strip() if stamp.is_file() else "unknown"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="the same code path at tiny sizes on CPU")
    ap.add_argument("--out", type=Path, default=None, help="folder for the JSON and .md (default benchmarks/results; "
                    "required with --cpu-smoke, whose numbers are no figures)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma list of " + ", ".join(SECTIONS))
    ap.add_argument("--box", action="append", default=[], metavar="SECTION=SECONDS", help="change a section's box")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one, removed)")
    args = ap.parse_args(argv)

    import torch

    if args.cpu_smoke and args.out is None:
        ap.error("--cpu-smoke needs --out (its tiny-size numbers do not belong in benchmarks/results)")
    device = "cpu" if args.cpu_smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_suite: no CUDA device visible to torch (use --cpu-smoke on a machine without one)", file=sys.stderr)
        return 1
    plan = smoke_plan() if args.cpu_smoke else gpu_plan()
    for item in args.box:
        name, _, secs = item.partition("=")
        if name not in plan.boxes:
            ap.error(f"--box {item}: unknown section (choose from {', '.join(SECTIONS)})")
        plan.boxes[name] = float(secs)
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in wanted if s not in SECTIONS]
    if bad:
        ap.error(f"--sections: unknown {', '.join(bad)}")
    out_dir = args.out or REPO / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu_suite_")))
        work.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
        env["PYTHONUNBUFFERED"] = "1"
        if device == "cpu":
            env.setdefault("TRITON_INTERPRET", "1")
            env.setdefault("OMP_NUM_THREADS", "1")
        ctx = Ctx(plan=plan, work=work, out_dir=out_dir, env=env, device=device)
        fns = {"environment": section_environment, "kernels": section_kernels, "training": section_training,
               "resume": section_resume, "sampling": section_sampling}
        t0 = time.monotonic()
        results = {s: (run_section(s, fns[s], ctx) if s in wanted else {"status": "not run"}) for s in SECTIONS}
        logs = work / "logs"
        if logs.is_dir() and args.out is not None:  # one file: the device tool brings back a few files only
            import tarfile

            with tarfile.open(out_dir / "gpu_suite_logs.tar.gz", "w:gz") as tar:
                tar.add(logs, arcname="logs")
    gpu = results["environment"].get("gpu") if device == "cuda" else None
    name = gpu or ("cpu" if device == "cpu" else torch.cuda.get_device_name(0))
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    rep = {"device": name, "date": date, "commit": _commit(), "smoke": bool(args.cpu_smoke),
           "total_wall_s": round(time.monotonic() - t0, 1), "boxes_s": plan.boxes, "notes": ctx.notes, **results}
    stem = out_dir / f"gpu_suite_{slug}_{date}{'_smoke' if args.cpu_smoke else ''}"
    lines = table(rep)
    for path, text in ((stem.with_suffix(".json"), json.dumps(rep, indent=1, default=str) + "\n"),
                       (stem.with_suffix(".md"), "\n".join([f"# GPU suite: {name}", "", *lines, ""]))):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    print("\n".join(lines))
    print(f"wrote {stem.with_suffix('.json')} and .md")
    return 0 if all(results[s].get("status") in ("ok", "not run") for s in SECTIONS) else 3


if __name__ == "__main__":
    sys.exit(main())
