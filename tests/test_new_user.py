"""A new user's first commands: the README's train command on a fresh checkout, from any working directory.

A fresh clone has no runs/ and no built shards; the embedded default (configs/qm9_tiny.yaml, ``data.root:
bundled:qm9``) builds the bundled subset's shards into the user's cache on first use. ``SYMDIFF_CACHE`` (a user
setting documented in the README) points that cache into the test's temporary directory.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from symdiff.cli import main
from symdiff.config import load_config
from symdiff.data.shards import verify

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "qm9_tiny.yaml"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "SLURM_", "OMPI_", "PMI_"))}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    # This checkout's code, whichever checkout the installed package points at (a clone's tests test the clone).
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.update(extra)
    return env


def test_readme_train_command_works_on_a_fresh_checkout_from_another_directory(tmp_path: Path) -> None:
    cache, cwd = tmp_path / "cache", tmp_path / "somewhere" / "else"
    cwd.mkdir(parents=True)
    cmd = [sys.executable, "-m", "symdiff.cli", "train", "--config", str(TINY), "--run-dir", "R",
           "train.max_steps=2"]
    res = subprocess.run(cmd, cwd=cwd, env=_env(SYMDIFF_CACHE=str(cache), OMP_NUM_THREADS="1"),
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    built = sorted(cache.glob("bundled/qm9-*/manifest.json"))
    assert len(built) == 1, list(cache.rglob("*"))
    shards = built[0].parent
    assert verify(shards)["splits"]["train"]["n_molecules"] == 6000
    recorded = yaml.safe_load((cwd / "R" / "config.yaml").read_text())
    assert recorded["data"]["root"] == str(shards)  # absolute: the run can be resumed or sampled from anywhere
    assert (cwd / "R" / "checkpoints" / "step_00000002").is_dir()
    assert sorted(os.listdir(cwd)) == ["R"]  # nothing else written into the user's working directory


def test_relative_roots_are_relative_to_the_file_that_sets_them(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "cwd").mkdir()
    (tmp_path / "a" / "base.yaml").write_text(f"base: {TINY}\ndata:\n  root: ../shards/qm9\n")
    (tmp_path / "b" / "child.yaml").write_text("base: ../a/base.yaml\nmodel:\n  depth: 2\n")
    (tmp_path / "b" / "own.yaml").write_text("base: ../a/base.yaml\ndata:\n  root: mine\n")
    monkeypatch.chdir(tmp_path / "cwd")
    # inherited from the base file: relative to a/, not to b/ nor to the working directory
    assert load_config("../b/child.yaml").data.root == str(tmp_path / "shards" / "qm9")
    assert load_config(tmp_path / "b" / "own.yaml").data.root == str(tmp_path / "b" / "mine")
    # a command-line path is relative to the working directory, like --run-dir
    assert load_config("../b/child.yaml", ["data.root=here/qm9"]).data.root == str(tmp_path / "cwd" / "here" / "qm9")
    assert load_config("../b/child.yaml", ["data.root=/abs/qm9"]).data.root == "/abs/qm9"


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_name_the_same_data_from_any_directory(name: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SYMDIFF_CACHE", str(tmp_path / "cache"))
    roots = set()
    for where in (REPO, tmp_path):
        monkeypatch.chdir(where)
        roots.add(str(load_config(REPO / "configs" / name).data.root))
    (root,) = roots
    assert os.path.isabs(root)
    if name.startswith(("qm9_tiny", "qm9_fast_cpu")):  # the small CPU configs train on the bundled subset
        assert Path(root).parent == tmp_path / "cache" / "bundled" and (Path(root) / "manifest.json").is_file()
    else:  # the paper configs: the checkout's runs/data/<dataset>, as docs/data.md builds them
        assert root == str(REPO / "runs" / "data" / name.split("_")[0])


def _root_of_tiny(cache: str) -> str:
    os.environ["SYMDIFF_CACHE"] = cache
    return str(load_config(TINY).data.root)


def test_two_processes_building_the_bundled_data_at_once_agree(tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    with mp.get_context("spawn").Pool(2) as pool:
        got = pool.map(_root_of_tiny, [cache, cache])
    assert got[0] == got[1]
    assert verify(got[0])["splits"]["train"]["n_molecules"] == 6000
    assert [p.name for p in (tmp_path / "cache" / "bundled").iterdir()] == [Path(got[0]).name]  # no temp dirs


def test_cache_location_follows_the_users_settings(tmp_path: Path, monkeypatch) -> None:
    from symdiff.data.bundled import cache_dir

    monkeypatch.delenv("SYMDIFF_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "symdiff"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "symdiff"
    monkeypatch.setenv("SYMDIFF_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


def test_an_unknown_bundled_name_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("SYMDIFF_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    rc = main(["train", "--config", str(TINY), "--run-dir", "R", "data.root=bundled:qm10"])
    err = capsys.readouterr().err.strip()
    assert rc == 1
    assert err == "symdiff train: error: data.root 'bundled:qm10': no such bundled dataset (known: bundled:qm9)"
    assert not (tmp_path / "R").exists() and not (tmp_path / "cache").exists()


def test_an_unwritable_cache_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("SYMDIFF_CACHE", str(blocker / "cache"))
    rc = main(["train", "--config", str(TINY), "--run-dir", str(tmp_path / "R")])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err.startswith(f"symdiff train: error: {blocker / 'cache' / 'bundled'}: cannot create the data "
                                      "cache") and "SYMDIFF_CACHE" in err and "\n" not in err


def test_eval_takes_the_bundled_name_as_its_data_root(tmp_path: Path, monkeypatch, capsys) -> None:
    import json

    import numpy as np

    from symdiff.data.shards import read_split
    from symdiff.io.molfiles import write_xyz

    monkeypatch.setenv("SYMDIFF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SYMDIFF_CACHE_DIR", str(tmp_path / "eval_cache"))
    monkeypatch.setenv("SYMDIFF_SHARED", str(tmp_path / "no_shared_data"))  # a fresh machine: no ../shared
    monkeypatch.chdir(tmp_path)
    train = read_split(load_config(TINY).data.root, "train")
    write_xyz(tmp_path / "own.xyz", train.select(np.arange(5)))
    rc = main(["eval", "--samples", "own.xyz", "--dataset", "qm9", "--data-root", "bundled:qm9", "--json", "m.json"])
    assert rc == 0, capsys.readouterr().err
    m = json.loads((tmp_path / "m.json").read_text())
    # molecules of the bundled training split: the novelty reference is that split, so none of them is novel
    assert m["n_molecules"] == 5 and m["validity"] > 0 and m["novelty"] == 0.0


def test_the_python_api_resolves_a_stored_bundled_root(tmp_path: Path, monkeypatch) -> None:
    from symdiff.config import from_dict

    monkeypatch.setenv("SYMDIFF_CACHE", str(tmp_path / "cache"))
    root = Path(str(from_dict({"data": {"root": "bundled:qm9"}}).data.root))
    assert root.parent == tmp_path / "cache" / "bundled" and verify(root)["dataset"] == "qm9"
