"""Ahead-of-time build of every fused kernel for a GPU architecture, without a GPU.

The interpreter runs the kernels' semantics on CPU but never lowers them, so a construct the GPU compiler rejects,
or a tile that spills registers, would only show on the first GPU run. This lowers each specialisation the
wrappers launch through Triton's real pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin, using the ptxas bundled
with the triton wheel) and reads registers and stack (spill) bytes from the cubin with the bundled cuobjdump.

    python -m symdiff.kernels.compile_check [--arch 90] [--json OUT]

TRITON_INTERPRET must not be set (the JIT would hand back interpreter objects instead of compiled kernels).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Any


def _specs() -> list[tuple[str, Any, dict[str, str], dict[str, Any], int]]:
    """(label, jit function, signature, constexprs, num_warps) for each launched specialisation (fp32 data)."""
    import triton.language as tl

    from . import com, gaussian, qr

    f = "*fp32"
    out = []
    gsig = {"x_ptr": f, "m_ptr": f, "invn_ptr": f, "nhi_ptr": "*i32", "mu_ptr": f, "s_ptr": f}
    fb, bb = gaussian.FWD_BLOCKS, gaussian.BWD_BLOCKS
    for label, fn, extra, p in (
            ("gaussian_fwd", gaussian._gauss_fwd_kernel, {"out_ptr": f, "N": "i32", "K": "i32"}, fb),
            ("gaussian_bwd", gaussian._gauss_bwd_kernel,
             {"g_ptr": f, "gx_ptr": f, "gmu_ptr": f, "gs_ptr": f, "B": "i32", "N": "i32", "K": "i32",
              "NUM_I_BLOCKS": "i32"}, bb)):
        blocks = {k: p[k] for k in ("BLOCK_I", "BLOCK_J", "BLOCK_K")}
        sig = {**gsig, **extra, **{k: "constexpr" for k in blocks}, "DT": "constexpr"}
        out.append((label, fn, sig, {**blocks, "DT": tl.float32}, p["num_warps"]))
    for varlen in (False, True):
        block, warps = com._tile(None if varlen else 29)
        base = {"x_ptr": f, "m_ptr": f, "off_ptr": "*i64" if varlen else f}
        flags = {"HAS_MASK": not varlen, "VARLEN": varlen}
        for has_r in (True, False):
            for tr in (False, True):
                sig = {**base, "r_ptr": f, "y_ptr": f, "N": "i32", **{k: "constexpr" for k in flags},
                       "HAS_R": "constexpr", "TRANSPOSE": "constexpr", "BLOCK": "constexpr", "DT": "constexpr"}
                out.append((f"com_fwd{'_varlen' if varlen else ''}{'_R' if has_r else ''}{'_T' if tr else ''}",
                            com._com_fwd_kernel, sig,
                            {**flags, "HAS_R": has_r, "TRANSPOSE": tr, "BLOCK": block, "DT": tl.float32}, warps))
        for tr in (False, True):
            sig = {**base, "g_ptr": f, "gr_ptr": f, "N": "i32", **{k: "constexpr" for k in flags},
                   "TRANSPOSE": "constexpr", "BLOCK": "constexpr", "DT": "constexpr"}
            out.append((f"com_grad_r{'_varlen' if varlen else ''}{'_T' if tr else ''}", com._com_grad_r_kernel, sig,
                        {**flags, "TRANSPOSE": tr, "BLOCK": block, "DT": tl.float32}, warps))
    qsig = {"n_mol": "i32", "EPS": "constexpr", "BLOCK": "constexpr"}
    qc = {"EPS": qr.QR_EPS, "BLOCK": qr.BLOCK_MOL}
    out.append(("qr_fwd", qr._qr_fwd_kernel, {"m_ptr": f, "q_ptr": "*fp64", **qsig}, qc, qr.NUM_WARPS))
    out.append(("qr_bwd", qr._qr_bwd_kernel, {"m_ptr": f, "gq_ptr": f, "ga_ptr": "*fp64", **qsig}, qc,
                qr.NUM_WARPS))
    return out


def compile_all(arch: int = 90) -> list[dict[str, Any]]:
    """Build every specialisation for sm_<arch>; one dict per kernel with registers and spill (stack) bytes."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset (it builds real GPU binaries)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    target = GPUTarget("cuda", arch, 32)
    rows = []
    for label, fn, sig, consts, warps in _specs():
        kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target,
                                options={"num_warps": warps})
        with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
            fh.write(kernel.asm["cubin"])
            fh.flush()
            usage = subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-resource-usage", fh.name],
                                   capture_output=True, text=True, check=True).stdout
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
        if m is None:
            raise RuntimeError(f"{label}: no resource line in cuobjdump output:\n{usage}")
        regs, stack, shared, local = (int(v) for v in m.groups())
        rows.append({"kernel": label, "arch": f"sm_{arch}", "num_warps": warps, "registers": regs,
                     "stack_bytes": stack, "local_bytes": local, "static_shared_bytes": shared,
                     "constexprs": {k: (str(v) if not isinstance(v, (int, float, bool)) else v)
                                    for k, v in consts.items()}})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m symdiff.kernels.compile_check", description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90 = H100)")
    p.add_argument("--json", metavar="OUT", help="also write the rows as JSON")
    args = p.parse_args(argv)
    rows = compile_all(args.arch)
    print(f"{'kernel':<24}{'warps':>6}{'regs':>6}{'spill B':>9}")
    for r in rows:
        print(f"{r['kernel']:<24}{r['num_warps']:>6}{r['registers']:>6}{r['stack_bytes'] + r['local_bytes']:>9}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
