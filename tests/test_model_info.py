"""`symdiff info`: parameter counts printed and written as JSON, matching SPEC §3.5."""
from __future__ import annotations

import json

from symdiff.cli import main


def test_info_json_matches_spec(tmp_path, repo_root, capsys):
    out = tmp_path / "info.json"
    assert main(["info", "--config", str(repo_root / "configs" / "qm9_symdiff_s.yaml"), "--json", str(out)]) == 0
    params = json.loads(out.read_text())["params"]
    assert params == {"eps": 11_460_049, "gamma": 2_218_761, "total": 13_678_810}
    assert "13,678,810" in capsys.readouterr().out


def test_info_kinds_without_gamma_and_overrides(tmp_path, repo_root):
    out = tmp_path / "info.json"
    assert main(["info", "--config", str(repo_root / "configs" / "qm9_tiny_dit.yaml"), "--json", str(out),
                 "model.depth=2"]) == 0
    d = json.loads(out.read_text())
    assert d["kind"] == "dit" and d["params"]["gamma"] == 0 and d["params"]["total"] == d["params"]["eps"]


def test_info_bad_config_is_a_clear_error(tmp_path, capsys):
    assert main(["info", "--config", str(tmp_path / "missing.yaml")]) == 1
    assert "config file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  kind: transformer\n")
    assert main(["info", "--config", str(bad)]) != 0


def test_info_reads_no_data_and_builds_no_cache(tmp_path, repo_root, monkeypatch, capsys):
    # qm9_tiny names bundled:qm9; counting parameters must not build its shards into the user's cache first.
    monkeypatch.setenv("SYMDIFF_CACHE", str(tmp_path / "cache"))
    assert main(["info", "--config", str(repo_root / "configs" / "qm9_tiny.yaml")]) == 0
    assert "1,193,522" in capsys.readouterr().out
    assert not (tmp_path / "cache").exists()
