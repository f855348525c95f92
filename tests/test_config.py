from pathlib import Path

import pytest

from symdiff.config import ConfigError, config_hash, load_config


def _write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_yaml_and_overrides_typed(tmp_path):
    p = _write(tmp_path, "name: t\ndata:\n  root: /x\ntrain:\n  lr: 1.0e-4\n")
    cfg = load_config(p, ["train.lr=2e-4", "model.depth=3"])
    assert cfg.train.lr == pytest.approx(2e-4) and isinstance(cfg.train.lr, float)
    assert cfg.model.depth == 3 and cfg.data.root == "/x"


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    p = _write(tmp_path, "data:\n  root: /x\ntrain:\n  lrr: 1.0\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "lrr" in str(e.value) and str(p) in str(e.value)


def test_wrong_type_and_unknown_override(tmp_path):
    p = _write(tmp_path, "data:\n  root: /x\n")
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_config(p, ["train.max_steps=ten"])
    with pytest.raises(ConfigError, match="model.dpeth"):
        load_config(p, ["model.dpeth=3"])


def test_base_chain_and_hash(tmp_path):
    _write(tmp_path, "data:\n  root: /x\nmodel:\n  depth: 2\n", "base.yaml")
    p = _write(tmp_path, "base: base.yaml\nmodel:\n  hidden_size: 64\n")
    cfg = load_config(p)
    assert cfg.model.depth == 2 and cfg.model.hidden_size == 64
    assert config_hash(cfg) != config_hash(load_config(p, ["model.depth=3"]))
    assert config_hash(cfg) == config_hash(load_config(p, ["train.lr=1e-3"]))


def test_missing_root_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="data.root"):
        load_config(_write(tmp_path, "name: x\n"))
