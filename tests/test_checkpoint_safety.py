"""No code runs from a checkpoint file, and loading never falls back silently (issue #12, sections 2-4).

A crafted file here is a real file of a real training run (or a real export) with one more entry whose unpickling
would create a marker directory (``os.makedirs``), the way a malicious pickle runs its payload. COMPLETE.json's
sizes and checksums are recomputed to match, so only the loader stands between the payload and the user. Each
of the four paths of the issue (`sample --ckpt FILE`, `eval --nll RUN`, `train --resume DIR`, `sample --run DIR`)
must refuse it with one line, exit 1, and the marker must never appear.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from symdiff.cli import main
from symdiff.data.shards import sha256_file
from symdiff.errors import CheckpointError
from symdiff.train import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "qm9_tiny.yaml"
TINY = ["model.hidden_size=32", "model.xh_hidden_size=16", "model.num_gaussians=16", "model.depth=1",
        "model.num_heads=2", "model.gamma_depth=1", "model.gamma_hidden_size=16", "model.gamma_dec_hidden=16",
        "model.gamma_num_heads=2", "data.batch_size=16", "train.grad_shards=2", "train.ema_decay=0.9",
        "model.kernel_backend=torch"]
TAG = "step_00000002"


class Payload:
    """Unpickling this creates ``marker``: what `weights_only=False` would do with an attacker's file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "SLURM_", "OMPI_", "PMI_"))}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    env["OMP_NUM_THREADS"] = "1"
    return env


def _symdiff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "symdiff.cli", *args], env=_env(), capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A real 2-step ZeRO-1 run (DeepSpeed optimizer shards with fragment_address, LossScaler, ZeroStageEnum)."""
    from symdiff.data.bundled import ensure_bundled_shards

    root = tmp_path_factory.mktemp("safety")
    shards = ensure_bundled_shards(root / "qm9_bundled")
    run_dir = root / "run"
    res = _symdiff("train", "--config", str(CONFIG), "--run-dir", str(run_dir), f"data.root={shards}", *TINY,
                   "train.zero_stage=1", "train.max_steps=2", "train.ckpt_every=2", "train.log_every=1")
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    return run_dir


@pytest.fixture(scope="module")
def export(run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "model.pt"
    res = subprocess.run([sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), str(run), str(out)],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def _copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def _inject(path: Path, marker: Path, **replace) -> None:
    """Add the payload to a real torch file (and replace entries), keeping everything else as it was."""
    blob = torch.load(path, map_location="cpu", weights_only=False)  # our own file, written by the fixture
    blob.update(replace)
    blob["note"] = Payload(marker)
    torch.save(blob, path)


def _recompute_marker(tag_dir: Path, **meta_changes) -> None:
    marker = tag_dir / ckpt.MARKER
    meta = json.loads(marker.read_text())
    meta["files"] = {str(f.relative_to(tag_dir)): {"size": f.stat().st_size, "sha256": sha256_file(f)}
                     for f in sorted(tag_dir.rglob("*")) if f.is_file() and f.name != ckpt.MARKER}
    meta.update(meta_changes)
    marker.write_text(json.dumps(meta))
    assert ckpt.verify(tag_dir) is not None  # the crafted checkpoint passes every integrity check


def _crafted_run(run: Path, dest: Path, file: str, marker: Path) -> Path:
    crafted = _copy_run(run, dest)
    tag_dir = crafted / "checkpoints" / TAG
    _inject(tag_dir / file, marker)
    _recompute_marker(tag_dir)
    return crafted


def _one_line_refusal(err: str, command: str, file: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(f"symdiff {command}: error:")]
    assert "Traceback" not in err, err[-3000:]
    assert len(errors) == 1, err[-3000:]
    assert file in errors[0] and "refused" in errors[0] and "os.makedirs" in errors[0], errors[0]


# ------------------------------------------------------------------------------------------- the four paths


def test_sample_ckpt_refuses_a_crafted_export(export, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    crafted = tmp_path / "crafted.pt"
    shutil.copy(export, crafted)
    _inject(crafted, marker)
    out = tmp_path / "mols.xyz"
    rc = main(["sample", "--ckpt", str(crafted), "--n", "2", "--steps", "2", "--out", str(out), "--no-progress"])
    assert rc == 1
    _one_line_refusal(capsys.readouterr().err, "sample", "crafted.pt")
    assert not marker.exists() and not out.exists()


def test_eval_nll_refuses_a_crafted_state_file(run, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    crafted = _crafted_run(run, tmp_path / "crafted", ckpt.STATE_FILE, marker)
    assert main(["eval", "--nll", str(crafted), "--dataset", "qm9"]) == 1
    _one_line_refusal(capsys.readouterr().err, "eval", ckpt.STATE_FILE)
    assert not marker.exists()


def test_sample_run_refuses_crafted_state_and_deepspeed_files(run, tmp_path, capsys):
    out = tmp_path / "mols.xyz"
    for file, extra in ((ckpt.STATE_FILE, []), ("mp_rank_00_model_states.pt", ["--no-ema"]),
                        ("zero_pp_rank_0_mp_rank_00_optim_states.pt", ["--no-ema"])):
        marker = tmp_path / f"PWNED_{file}"
        crafted = _crafted_run(run, tmp_path / f"crafted_{file}", file, marker)
        rc = main(["sample", "--run", str(crafted), "--n", "2", "--steps", "2", "--out", str(out), "--no-progress",
                   *extra])
        assert rc == 1, file
        _one_line_refusal(capsys.readouterr().err, "sample", file)
        assert not marker.exists() and not out.exists(), file


@pytest.mark.parametrize("file", ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "rank_00000.pt"])
def test_train_resume_refuses_crafted_files(run, tmp_path, file):
    # The DeepSpeed shard would be unpickled freely inside engine.load_checkpoint; the rank file is read last,
    # after the engine has loaded: both ends of the resume path.
    marker = tmp_path / "PWNED"
    crafted = _crafted_run(run, tmp_path / "crafted", file, marker)
    cfg = crafted / "config.yaml"  # the resolved config the run wrote: same model, so only the files can refuse
    res = _symdiff("train", "--config", str(cfg), "--run-dir", str(tmp_path / "new"), "--resume", str(crafted),
                   "train.max_steps=3")
    assert res.returncode == 1, (res.stdout + res.stderr)[-4000:]
    _one_line_refusal(res.stderr, "train", file)
    assert not marker.exists()


@pytest.mark.parametrize("file", [ckpt.STATE_FILE, "rank_00000.pt", "mp_rank_00_model_states.pt"])
def test_resume_plan_refuses_crafted_files_before_anything_is_built(run, tmp_path, file):
    marker = tmp_path / "PWNED"
    crafted = _crafted_run(run, tmp_path / "crafted", file, marker)
    tag_dir = ckpt.find_resume(crafted, "auto")
    refused = rf"{file.replace('.', '[.]')}: refused to load: .*os[.]makedirs"
    with pytest.raises(CheckpointError, match=refused):
        ckpt.plan_resume(tag_dir, 1, 1, crafted / "checkpoints")
    if file.startswith("rank_"):
        with pytest.raises(CheckpointError, match=refused):
            ckpt.load_rank_state(tag_dir, 0)
    assert not marker.exists()


def test_deepspeed_loaders_never_see_a_crafted_file(run, tmp_path):
    """Universal conversions cached in the run directory and ZeRO-3's zero_to_fp32 go to DeepSpeed's unrestricted
    torch.load; the crafted file is refused before."""
    marker = tmp_path / "PWNED"
    crafted = _copy_run(run, tmp_path / "crafted")
    tag_dir = crafted / "checkpoints" / TAG
    fragment = crafted / "checkpoints" / "universal" / TAG / "zero" / "model.embedding.proj.weight" / "exp_avg.pt"
    fragment.parent.mkdir(parents=True)
    torch.save({"param": torch.zeros(3), "note": Payload(marker)}, fragment)
    plan = ckpt.ResumePlan(tag_dir, ckpt.verify(tag_dir), ckpt.read_state(tag_dir), True, crafted / "checkpoints")
    with pytest.raises(CheckpointError, match=r"exp_avg\.pt: refused to load: .*os\.makedirs"):
        ckpt.load_engine(None, plan)  # refused before the engine is touched
    _inject(tag_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    _recompute_marker(tag_dir, zero_stage=3)  # fp32_weights hands stage-3 checkpoints to zero_to_fp32
    with pytest.raises(CheckpointError, match=r"optim_states\.pt: refused to load"):
        ckpt.fp32_weights(tag_dir)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------- legit files load


def test_real_checkpoints_and_exports_load_with_weights_only(run, export, tmp_path):
    tag_dir = run / "checkpoints" / TAG
    # our own files need nothing beyond tensors and plain data: the RNG states are stored as tensors
    for f in (tag_dir / ckpt.STATE_FILE, tag_dir / ckpt.rank_file(0), export):
        torch.load(f, map_location="cpu", weights_only=True)
    ckpt.check_deepspeed_files(tag_dir)
    state, rank = ckpt.read_state(tag_dir), ckpt.load_rank_state(tag_dir, 0)
    assert int(state["step"]) == 2 and rank["loader"]["next_batch"] == 2
    weights = ckpt.fp32_weights(tag_dir)
    for src in (run, tag_dir, export):
        _, m_ema = ckpt.load_for_inference(src)
        _, m_raw = ckpt.load_for_inference(src, use_ema=False)
        for k, p in m_ema.named_parameters():
            assert torch.equal(p.detach(), state["ema"][k]), (src, k)
            assert torch.equal(dict(m_raw.named_parameters())[k].detach(), weights[k]), (src, k)
        assert torch.equal(m_ema.n_atoms_hist, state["buffers"]["n_atoms_hist"])
    out = tmp_path / "mols.xyz"
    assert main(["sample", "--run", str(run), "--n", "2", "--steps", "2", "--out", str(out), "--no-progress"]) == 0
    assert out.is_file()


def test_rank_files_of_the_old_format_still_restore_the_rngs(tmp_path):
    """Rank files written before RNG states became tensors hold numpy's key array: allowed, and nothing else."""
    old = tmp_path / ckpt.rank_file(0)
    torch.save({"rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
                "loader": {"epoch": 0}}, old)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    ckpt.set_rng_state(ckpt.load_rank_state(tmp_path, 0)["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]
    # the new format round-trips through a weights-only load as exactly
    torch.save({"rng": ckpt.rng_state(), "loader": {}}, old)
    expected = (torch.rand(3), np.random.rand(3), np.random.randn(), random.random())
    ckpt.set_rng_state(torch.load(old, weights_only=True)["rng"])
    assert (torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])
            and np.random.randn() == expected[2] and random.random() == expected[3])


def test_trust_pickle_is_the_explicit_way_out(export, tmp_path, capsys):
    # a harmless class outside the allow-list stands for "needs more than tensors": refused, then trusted
    odd = tmp_path / "odd.pt"
    blob = torch.load(export, weights_only=True)
    blob["source"] = Path("/somewhere")
    torch.save(blob, odd)
    out = tmp_path / "mols.xyz"
    args = ["sample", "--ckpt", str(odd), "--n", "1", "--steps", "2", "--out", str(out), "--no-progress"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "refused to load" in err and "PosixPath" in err and "--trust-pickle" in err
    assert main([*args, "--trust-pickle"]) == 0 and out.is_file()


def test_without_the_flag_no_file_is_fully_unpickled(export, tmp_path, monkeypatch, caplog):
    # every torch.load on the way from a checkpoint to molecules is weights-only unless --trust-pickle is given
    calls, real = [], torch.load

    def spy(*a, **k):
        calls.append(k.get("weights_only"))
        return real(*a, **k)

    monkeypatch.setattr(torch, "load", spy)
    out = tmp_path / "mols.xyz"
    args = ["sample", "--ckpt", str(export), "--n", "1", "--steps", "2", "--out", str(out), "--no-progress"]
    assert main(args) == 0 and calls and all(c is True for c in calls), calls
    calls.clear()
    with caplog.at_level("WARNING", logger="symdiff.train.safe_load"):
        assert main([*args, "--overwrite", "--trust-pickle"]) == 0
    assert False in calls and "--trust-pickle: opened with torch's full unpickler" in caplog.text


# ------------------------------------------------------------------------------------------- no silent fallback


def test_non_checkpoint_files_give_one_line(export, tmp_path, capsys):
    text = tmp_path / "notes.pt"
    text.write_text("hello\n")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    zipped = tmp_path / "archive.pt"
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("a.txt", "x")
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], listed)
    wrong = tmp_path / "wrong.pt"
    torch.save({"config": "qm9", "weights": [1, 2]}, wrong)
    plain = tmp_path / "plain.pt"
    plain.write_bytes(pickle.dumps({"config": {}, "weights": {}}, protocol=4))  # a pickle, not a torch file
    for f in (text, empty, zipped, listed, wrong, plain):
        rc = main(["sample", "--ckpt", str(f), "--n", "1", "--out", str(tmp_path / "m.xyz"), "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 1, f
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert err.startswith("symdiff sample: error:") and f.name in err, err


def _edited_export(export: Path, dest: Path, edit) -> Path:
    blob = torch.load(export, weights_only=True)
    edit(blob)
    torch.save(blob, dest)
    return dest


def test_missing_ema_and_missing_buffers_are_errors(run, export, tmp_path):
    no_ema = _edited_export(export, tmp_path / "no_ema.pt", lambda b: b.pop("ema"))
    with pytest.raises(CheckpointError, match=r"no_ema\.pt: holds no EMA weights; .*--no-ema"):
        ckpt.load_for_inference(no_ema)
    ckpt.load_for_inference(no_ema, use_ema=False)  # the raw weights, asked for explicitly

    def drop_hist(b):
        for sd in (b["weights"], b["ema"]):
            sd.pop("n_atoms_hist")
    no_hist = _edited_export(export, tmp_path / "no_hist.pt", drop_hist)
    for use_ema in (True, False):
        with pytest.raises(CheckpointError, match=r"missing n_atoms_hist"):
            ckpt.load_for_inference(no_hist, use_ema=use_ema)

    crafted = _copy_run(run, tmp_path / "no_buffers")
    tag_dir = crafted / "checkpoints" / TAG
    state = torch.load(tag_dir / ckpt.STATE_FILE, weights_only=True)
    state["buffers"] = {}
    torch.save(state, tag_dir / ckpt.STATE_FILE)
    _recompute_marker(tag_dir)
    with pytest.raises(CheckpointError, match=r"missing n_atoms_hist"):
        ckpt.load_for_inference(crafted)

    extra = _edited_export(export, tmp_path / "extra.pt", lambda b: b["ema"].update(stray=torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"unexpected stray \(2,\)"):
        ckpt.load_for_inference(extra)
