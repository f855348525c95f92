"""Where along the diffusion a trained model loses molecules: noise real QM9 molecules to step t0, denoise back.

Takes a run directory or checkpoint of `symdiff train` (its EMA weights, loaded as `symdiff sample` loads them), or
EMA weights saved by the earlier `bench_model_learning_curve.py --save-ema` (its own training loop), draws
molecules from the EDM training split of ../shared/data/qm9/qm9.npz, diffuses them to t0 (q(z_t0 | x, h)), runs the
model's own ancestral steps t0 -> 0 and the final p(x, h | z_0), and scores the result with the EDM protocol. t0 = 0
only decodes (it must give the data's own stability: a check of the sampler's ends); larger t0 shows how much noise
the denoiser can undo. A well-trained model keeps high stability up to large t0; the gap to the data row says where
to look.

Usage: .venv/bin/python benchmarks/diag_partial_denoise.py RUN_DIR|runs/lc/symdiff_ema.pt [--t0 0 10 50 100 200 500]
           [--n 200] [--out benchmarks/results/partial_denoise_<name>.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

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


@torch.inference_mode()
def denoise_from(model, batch, t0: int):
    from symdiff.diffusion import edm

    x, h, mask, _, _ = model.features(batch)
    xh = torch.cat([x, h], dim=-1)
    z = xh
    if t0 > 0:
        g = model.schedule.gamma(torch.full((xh.shape[0],), t0))
        alpha, sigma = edm._bcast(model.schedule.alpha(g), xh), edm._bcast(model.schedule.sigma(g), xh)
        z = alpha * xh + sigma * edm.sample_noise(mask, model.d, xh.dtype, model.backend)
    for t in range(t0, 0, -1):
        z = model.reverse_step(z, mask, t, t - 1)
    return (*model.decode(z, mask), mask)


def main() -> int:
    from _machine import machine
    from bench_model_learning_curve import write_json

    from symdiff.config import from_dict
    from symdiff.data.batch import collate
    from symdiff.data.molecules import MoleculeSet
    from symdiff.eval.metrics import evaluate_edm_protocol
    from symdiff.models import build_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("weights", help="a symdiff train run dir or checkpoint, or EMA weights saved by "
                    "bench_model_learning_curve.py --save-ema")
    ap.add_argument("--t0", type=int, nargs="+", default=[0, 10, 50, 100, 200, 500])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "qm9" / "qm9.npz"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if Path(args.weights).is_dir():  # a run or checkpoint of the product trainer
        from symdiff.config import to_dict
        from symdiff.train.checkpoint import load_for_inference

        cfg, model = load_for_inference(args.weights, use_ema=True)
        saved = {"config": to_dict(cfg), "step": None}
    else:
        saved = torch.load(args.weights, map_location="cpu", weights_only=True)  # tensors + config: no code runs
        model = build_model(from_dict(saved["config"]))
        model.load_state_dict(saved["ema"])
    model.eval()
    mols, train_idx = load_qm9(Path(args.data))
    idx = np.random.default_rng(args.seed).choice(train_idx, min(args.n, len(train_idx)), replace=False)
    batch = collate(mols, idx)
    rows = []
    for t0 in args.t0:
        torch.manual_seed(args.seed + t0)
        t = time.perf_counter()
        X, Z, mask = denoise_from(model, batch, t0)
        X, Z, mask = X.float().numpy(), Z.numpy(), mask.numpy()
        got = MoleculeSet.from_lists([Z[i][mask[i]] for i in range(len(idx))], [X[i][mask[i]] for i in range(len(idx))],
                                     ids=[int(i) for i in idx])
        res = evaluate_edm_protocol(got, "qm9")
        row = {"t0": t0, "atom_stability": res["atom_stability"], "mol_stability": res["mol_stability"],
               "validity": res["validity"], "seconds": time.perf_counter() - t}
        rows.append(row)
        print(json.dumps(row), flush=True)
    name = Path(args.weights).stem
    out = Path(args.out or REPO / "benchmarks" / "results" / f"partial_denoise_{name}.json")
    write_json(out, {"machine": machine(), "weights": str(args.weights), "step": saved.get("step"),
                     "kind": saved["config"]["model"]["kind"], "n_molecules": len(idx), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
