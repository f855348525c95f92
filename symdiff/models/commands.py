"""`symdiff info --config C [--json OUT]`: parameter counts of the model a config describes (SPEC §3.5)."""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="experiment YAML (configs/NAME.yaml)")
    parser.add_argument("--json", dest="json_out", default=None, help="also write the counts as JSON here")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.depth=6")


def run(args: argparse.Namespace) -> int:
    from symdiff.config import ConfigError, load_config
    from symdiff.models import build_model, count_params

    try:
        cfg = load_config(args.config, list(args.overrides))
    except ConfigError as exc:
        # data.root only matters for training: `info` also runs on a config that leaves it unset.
        if "data.root" not in str(exc):
            raise
        cfg = load_config(args.config, ["data.root=unused", *args.overrides])
    model = build_model(cfg)
    params = count_params(model)
    m = cfg.model
    print(f"config     {args.config}  (kind={m.kind}, dataset={cfg.data.dataset})")
    print(f"eps        {params['eps']:>13,d}   H={m.hidden_size} depth={m.depth} heads={m.num_heads} "
          f"n_z={m.xh_hidden_size} K={m.num_gaussians}")
    print(f"gamma      {params['gamma']:>13,d}   " + (
        f"m={m.gamma_hidden_size} depth={m.gamma_depth} heads={m.gamma_num_heads} m'={m.gamma_dec_hidden}"
        if model.gamma_net is not None else "(no learned gamma for this kind)"))
    print(f"total      {params['total']:>13,d}")
    if args.json_out:
        out = Path(args.json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"config": str(args.config), "kind": str(m.kind), "params": params}, f, indent=2)
        os.replace(tmp, out)
    return 0
