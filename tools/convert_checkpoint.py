#!/usr/bin/env python
"""Export a training checkpoint (any ZeRO stage, any world size) as one plain fp32 file for sampling anywhere.

    python tools/convert_checkpoint.py RUN_DIR_or_CHECKPOINT_DIR OUT.pt

OUT.pt holds {"config": resolved config dict, "weights": fp32 state dict, "ema": EMA state dict, "step": int,
"source": str}, both state dicts with the model's buffers (e.g. p(N)): tensors and plain data only, so it loads
with torch.load(weights_only=True) and nothing in it can run code. `symdiff sample --ckpt OUT.pt` and
`symdiff.train.checkpoint.load_for_inference(OUT.pt)` read it; no DeepSpeed is needed to use it.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="run directory or checkpoint directory (checkpoints/step_XXXXXXXX)")
    ap.add_argument("out", help="output .pt file (written atomically)")
    args = ap.parse_args(argv)

    import torch

    from symdiff.errors import UserError
    from symdiff.train import checkpoint as ckpt

    try:
        tag_dir = ckpt.resolve_checkpoint(Path(args.source))
        state = ckpt.read_state(tag_dir)
        weights = ckpt.fp32_weights(tag_dir)
        buffers = state["buffers"]
        blob = {"config": state["config"], "step": int(state["step"]), "source": str(tag_dir),
                "weights": {**weights, **buffers}, "ema": {**state["ema"], **buffers}}
    except UserError as exc:
        print(f"convert_checkpoint: error: {exc}", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    torch.save(blob, tmp)
    torch.load(tmp, weights_only=True)  # what users exchange must load without unpickling any object
    os.replace(tmp, out)
    n = sum(v.numel() for k, v in weights.items())
    print(f"wrote {out}: step {blob['step']}, {len(weights)} tensors, {n} parameters (fp32 + EMA) from {tag_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
