"""`symdiff info --config C [--json OUT]`: parameter counts of the model a config describes (SPEC §3.5)."""
from __future__ import annotations

import argparse
import json

from symdiff.outputs import add_overwrite_flag, check_output_file, write_text_atomic


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="experiment YAML (configs/NAME.yaml)")
    parser.add_argument("--json", dest="json_out", default=None, help="also write the counts as JSON here")
    add_overwrite_flag(parser)
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.depth=6")


def run(args: argparse.Namespace) -> int:
    from symdiff.config import ConfigError, load_config
    from symdiff.models import build_model, count_params

    if args.json_out:
        check_output_file(args.json_out, "--json", args.overwrite)
    try:
        cfg = load_config(args.config, list(args.overrides), data=False)
    except ConfigError as exc:
        # data.root only matters for training: `info` also runs on a config that leaves it unset.
        if "data.root" not in str(exc):
            raise
        cfg = load_config(args.config, ["data.root=unused", *args.overrides], data=False)
    model = build_model(cfg)
    params = count_params(model)
    m = cfg.model
    print(f"config     {args.config}  (kind={m.kind}, dataset={cfg.data.dataset})")
    if m.kind == "egnn":
        e = m.egnn
        print(f"eps        {params['eps']:>13,d}   EGNN nf={e.nf} layers={e.n_layers} "
              f"inv_sublayers={e.inv_sublayers}")
    else:
        print(f"eps        {params['eps']:>13,d}   H={m.hidden_size} depth={m.depth} heads={m.num_heads} "
              f"n_z={m.xh_hidden_size} K={m.num_gaussians}")
    print(f"gamma      {params['gamma']:>13,d}   " + (
        f"m={m.gamma_hidden_size} depth={m.gamma_depth} heads={m.gamma_num_heads} m'={m.gamma_dec_hidden}"
        if model.gamma_net is not None else "(no learned gamma for this kind)"))
    print(f"total      {params['total']:>13,d}")
    if args.json_out:
        write_text_atomic(args.json_out, json.dumps({"config": str(args.config), "kind": str(m.kind),
                                                     "params": params}, indent=2), "--json")
    return 0
