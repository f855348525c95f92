"""`symdiff sample` end to end from an exported checkpoint file: sizes, elements, file formats, errors."""
from __future__ import annotations

import torch

from symdiff.cli import main
from symdiff.config import load_config, to_dict
from symdiff.io.molfiles import read_molecules
from symdiff.models import build_model

TINY = ["data.root=does/not/exist", "model.hidden_size=48", "model.xh_hidden_size=24", "model.num_gaussians=12",
        "model.depth=2", "model.num_heads=4", "model.gamma_hidden_size=16", "model.gamma_depth=2",
        "model.gamma_num_heads=2", "model.gamma_dec_hidden=16", "model.kernel_backend=torch"]


def export(tmp_path):
    torch.manual_seed(0)
    cfg = load_config(None, TINY)
    model = build_model(cfg)
    with torch.no_grad():
        model.eps_net.dit.final_linear.weight.normal_(std=0.01)
    sd = {k: v for k, v in model.state_dict().items()}
    # The EMA copy holds parameters only (no buffers), as the trainer saves it.
    ema = {k: v.clone() for k, v in model.named_parameters()}
    path = tmp_path / "model.pt"
    torch.save({"config": to_dict(cfg), "weights": sd, "ema": ema}, path)
    return path


def test_sample_command_writes_sdf_and_xyz(tmp_path):
    ckpt = export(tmp_path)
    for ext in ("sdf", "xyz"):
        out = tmp_path / f"mols.{ext}"
        rc = main(["sample", "--ckpt", str(ckpt), "--n", "5", "--batch-size", "2", "--steps", "4", "--out", str(out),
                   "--no-progress", "--seed", "3"])
        assert rc == 0
        mols = read_molecules(out)
        assert len(mols) == 5
        assert set(mols.atomic_numbers.tolist()) <= {1, 6, 7, 8, 9}
        assert ((mols.n_atoms >= 3) & (mols.n_atoms <= 29)).all()


def test_sample_command_rejects_bad_input(tmp_path, capsys):
    ckpt = export(tmp_path)
    assert main(["sample", "--ckpt", str(ckpt), "--n", "2", "--out", str(tmp_path / "x.pdb")]) == 1
    assert "unknown extension '.pdb'" in capsys.readouterr().err
    assert main(["sample", "--ckpt", str(tmp_path / "nope.pt"), "--n", "2", "--out", str(tmp_path / "x.sdf")]) == 1
    assert "no such file" in capsys.readouterr().err
    assert main(["sample", "--ckpt", str(ckpt), "--n", "2", "--steps", "0", "--out", str(tmp_path / "x.sdf")]) == 1
    assert "--steps 0" in capsys.readouterr().err
    assert not (tmp_path / "x.sdf").exists()
