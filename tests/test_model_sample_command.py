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
    # As tools/convert_checkpoint.py writes it: the EMA parameters plus the model's buffers (p(N) among them).
    ema = {k: v.clone() for k, v in sd.items()}
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


# ------------------------------------------------------------------------------------- checked before the work (#12)
import errno  # noqa: E402
import os  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import symdiff.sampling as sampling  # noqa: E402
import symdiff.train.checkpoint as checkpoint  # noqa: E402


def _forbid(monkeypatch, module, name):
    def refuse(*a, **k):
        raise AssertionError(f"{name} was called: the bad input should have been refused before")
    monkeypatch.setattr(module, name, refuse)


def _err_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("device,expected", [("cuda", "--device cuda: no CUDA device"),
                                             ("cuda:0", "--device cuda:0: no CUDA device"),
                                             ("tpu", "--device tpu: unknown device"),
                                             ("cpu:x", "--device cpu:x: unknown device")])
def test_bad_device_is_refused_before_loading(tmp_path, monkeypatch, capsys, device, expected):
    ckpt = export(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _forbid(monkeypatch, checkpoint, "load_for_inference")
    rc = main(["sample", "--ckpt", str(ckpt), "--n", "2", "--steps", "2", "--out", str(tmp_path / "x.sdf"),
               "--device", device, "--no-progress"])
    assert rc == 1 and expected in _err_line(capsys)


def test_bad_out_is_refused_before_sampling(tmp_path, monkeypatch, capsys):
    ckpt = export(tmp_path)
    _forbid(monkeypatch, sampling, "sample_molecules")
    (tmp_path / "adir.sdf").mkdir()
    existing = tmp_path / "old.sdf"
    existing.write_text("earlier samples\n")
    cases = [(tmp_path / "adir.sdf", "is a directory"), (tmp_path / "missing" / "x.sdf", "does not exist"),
             (tmp_path / "x.mol2", "unknown extension '.mol2'"),
             (existing, "already exists; pass --overwrite to replace it")]
    for out, expected in cases:
        rc = main(["sample", "--ckpt", str(ckpt), "--n", "2", "--steps", "2", "--out", str(out), "--no-progress"])
        assert rc == 1 and expected in _err_line(capsys)
    assert existing.read_text() == "earlier samples\n"


def test_overwrite_replaces_and_a_full_disk_keeps_the_old_file(tmp_path, monkeypatch, capsys):
    ckpt = export(tmp_path)
    out = tmp_path / "s.xyz"
    out.write_text("earlier samples\n")
    argv = ["sample", "--ckpt", str(ckpt), "--n", "3", "--steps", "2", "--out", str(out), "--no-progress",
            "--overwrite"]

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    with monkeypatch.context() as m:
        m.setattr(os, "fsync", full_disk)
        assert main(argv) == 1
    assert f"--out {out}: cannot write: No space left on device" in _err_line(capsys)
    assert out.read_text() == "earlier samples\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "s.xyz"]  # no temporary left behind
    assert main(argv) == 0
    assert len(read_molecules(out)) == 3


def _export_with_sizes(tmp_path, n_atoms: int, data_root) -> object:
    """An exported checkpoint whose stored p(N) puts all mass on ``n_atoms``."""
    torch.manual_seed(0)
    cfg = load_config(None, [*TINY[1:], f"data.root={data_root}"])
    model = build_model(cfg)
    model.set_n_atoms_histogram({n_atoms: 100})
    sd = dict(model.state_dict())
    path = tmp_path / "sized.pt"
    torch.save({"config": to_dict(cfg), "weights": sd, "ema": {k: v.clone() for k, v in sd.items()}}, path)
    return path


def _shards_of_size(root, n_atoms: int) -> None:
    from symdiff.data.molecules import MoleculeSet
    from symdiff.data.shards import write_dataset

    n_mols = 20
    z = np.tile(np.array([6] + [1] * (n_atoms - 1), dtype=np.int64), n_mols)
    pos = np.random.default_rng(0).normal(size=(n_mols * n_atoms, 3)).astype(np.float32)
    offsets = np.arange(n_mols + 1, dtype=np.int64) * n_atoms
    mols = MoleculeSet(z, pos, offsets, np.arange(n_mols, dtype=np.int64), np.zeros(len(z), dtype=np.int64))
    write_dataset(root, "qm9", {"train": mols}, shard_size=10)


def test_sample_uses_the_checkpoints_p_of_n_not_a_dataset_found_on_disk(tmp_path, capsys):
    """The run's data root holds a dataset of 12-atom molecules; the checkpoint's p(N) says 7: 7 it is."""
    root = tmp_path / "shards"
    _shards_of_size(root, 12)
    ckpt = _export_with_sizes(tmp_path, 7, root)
    out = tmp_path / "s.npz"
    assert main(["sample", "--ckpt", str(ckpt), "--n", "4", "--steps", "2", "--out", str(out), "--no-progress"]) == 0
    assert read_molecules(out).n_atoms.tolist() == [7, 7, 7, 7]
    # asked for explicitly, the dataset's histogram is used
    assert main(["sample", "--ckpt", str(ckpt), "--n", "4", "--steps", "2", "--out", str(out), "--no-progress",
                 "--overwrite", "--n-atoms-from", str(root)]) == 0
    assert read_molecules(out).n_atoms.tolist() == [12, 12, 12, 12]
    assert main(["sample", "--ckpt", str(ckpt), "--n", "4", "--steps", "2", "--out", str(out), "--no-progress",
                 "--overwrite", "--n-atoms-from", str(tmp_path / "nope")]) == 1
    assert "--n-atoms-from" in _err_line(capsys)
