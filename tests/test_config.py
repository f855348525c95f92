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


# ------------------------------------------------------------------------------------------ value ranges (#12)
BAD_VALUES = [
    ("train.max_steps=0", "train.max_steps"), ("train.max_steps=-5", "train.max_steps"),
    ("diffusion.timesteps=0", "diffusion.timesteps"), ("train.ema_decay=1.5", "train.ema_decay"),
    ("train.ema_decay=1.0", "train.ema_decay"), ("data.batch_size=-1", "data.batch_size"),
    ("train.ckpt_every=0", "train.ckpt_every"), ("train.log_every=0", "train.log_every"),
    ("train.lr=-1e-4", "train.lr"), ("train.lr=0", "train.lr"), ("train.lr=nan", "train.lr"),
    ("train.lr=inf", "train.lr"), ("train.keep_last=-1", "train.keep_last"),
    ("train.clip_grad_norm=0", "train.clip_grad_norm"), ("train.eval_every=-1", "train.eval_every"),
    ("train.weight_decay=-1", "train.weight_decay"), ("train.warmup_steps=-1", "train.warmup_steps"),
    ("train.zero_stage=4", "train.zero_stage"), ("train.precision=fp16", "train.precision"),
    ("data.n_buckets=0", "data.n_buckets"), ("data.chunk_size=0", "data.chunk_size"),
    ("data.window_chunks=0", "data.window_chunks"), ("data.max_atoms_per_batch=-1", "data.max_atoms_per_batch"),
    ("data.seed=-1", "data.seed"), ("data.dataset=zinc", "data.dataset"),
    ("diffusion.precision=0", "diffusion.precision"), ("diffusion.precision=0.5", "diffusion.precision"),
    ("diffusion.schedule=cosine", "diffusion.schedule"), ("diffusion.schedule=polynomial_x", "diffusion.schedule"),
    ("diffusion.parameterization=x0", "diffusion.parameterization"),
    ("diffusion.normalize_factors=[1,4]", "diffusion.normalize_factors"),
    ("diffusion.normalize_factors=[1,4,10,2]", "diffusion.normalize_factors"),
    ("diffusion.normalize_factors=[1,0,10]", "diffusion.normalize_factors"),
    ("diffusion.normalize_factors=[1,-4,10]", "diffusion.normalize_factors"),
    ("model.kind=mace", "model.kind"), ("model.hidden_size=0", "model.hidden_size"),
    ("model.depth=0", "model.depth"), ("model.num_heads=0", "model.num_heads"),
    ("model.mlp_ratio=0", "model.mlp_ratio"), ("model.gamma_depth=0", "model.gamma_depth"),
    ("model.kernel_backend=cuda", "model.kernel_backend"), ("model.linear_backend=mkl", "model.linear_backend"),
    ("sample.steps=0", "sample.steps"), ("sample.n_samples=0", "sample.n_samples"),
    ("sample.batch_size=0", "sample.batch_size"),
]


@pytest.mark.parametrize("override,key", BAD_VALUES)
def test_out_of_range_override_is_refused_naming_key_and_source(tmp_path, override, key):
    p = _write(tmp_path, "data:\n  root: /x\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, [override])
    msg = str(e.value)
    assert f"key '{key}'" in msg and f"override '{override}'" in msg and "\n" not in msg


def test_out_of_range_value_in_a_base_file_names_that_file(tmp_path):
    base = _write(tmp_path, "data:\n  root: /x\ntrain:\n  ema_decay: 1.5\n", "base.yaml")
    p = _write(tmp_path, "base: base.yaml\nmodel:\n  depth: 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(base.resolve()) in str(e.value) and "train.ema_decay" in str(e.value) and "1.5" in str(e.value)
    # an override that fixes it wins, as overrides always do
    assert load_config(p, ["train.ema_decay=0.99"]).train.ema_decay == pytest.approx(0.99)


def test_sample_steps_may_not_exceed_timesteps(tmp_path):
    p = _write(tmp_path, "data:\n  root: /x\n")
    with pytest.raises(ConfigError, match=r"sample.steps 1000 exceeds diffusion.timesteps 100"):
        load_config(p, ["diffusion.timesteps=100"])
    cfg = load_config(p, ["diffusion.timesteps=100", "sample.steps=100"])
    assert cfg.diffusion.timesteps == 100 and cfg.sample.steps == 100


def test_stored_config_is_validated_too():
    from symdiff.config import from_dict, to_dict

    good = to_dict(load_config(None, ["data.root=/x"]))
    assert from_dict(good).train.ema_decay == pytest.approx(0.9999)
    bad = {**good, "train": {**good["train"], "log_every": 0}}
    with pytest.raises(ConfigError, match=r"run/config.yaml: key 'train.log_every'"):
        from_dict(bad, source="run/config.yaml")


def test_enum_lists_match_the_code():
    from symdiff.config import DATASETS, KERNEL_BACKENDS, LINEAR_BACKENDS, MODEL_KINDS
    from symdiff.data.elements import ALPHABETS
    from symdiff.kernels import BACKENDS
    from symdiff.kernels.linear import LINEAR_BACKENDS as LINEAR
    from symdiff.models import KINDS

    assert MODEL_KINDS == KINDS and KERNEL_BACKENDS == BACKENDS and LINEAR_BACKENDS == LINEAR
    assert set(DATASETS) == set(ALPHABETS)


def test_every_shipped_config_is_valid(repo_root):
    configs = sorted((repo_root / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        load_config(path, ["data.root=/x"])


# ------------------------------------------------------------------------------- files that are not configs (#12)
@pytest.mark.parametrize("text,expected", [
    (b"data:\n  root: /x\ntrain: [1\n", "cannot parse YAML: line"),
    (b"\xff\xfedata:\n  root: /x\n", "not a UTF-8 text file"),
    (b"- data\n- model\n", "top level is a list, expected a mapping"),
    (b"42\n", "top level is a number, expected a mapping"),
    (b"hello\n", "top level is a string, expected a mapping"),
    (b"data: 5\n", "key 'data'"),
    (b"base: [a.yaml]\n", "key 'base': expected a file name"),
    (b"data:\n  root: ${oc.env:SYMDIFF_SURELY_UNSET_VAR}\n", "key 'data.root'"),
])
def test_unreadable_config_is_one_line_naming_the_file(tmp_path, text, expected):
    p = tmp_path / "c.yaml"
    p.write_bytes(text)
    for path in (p, _write(tmp_path, "base: c.yaml\n", "child.yaml")):  # directly and through base:
        with pytest.raises(ConfigError) as e:
            load_config(path)
        msg = str(e.value)
        assert expected in msg and str(p.name) in msg and "\n" not in msg


def test_base_missing_or_circular(tmp_path):
    with pytest.raises(ConfigError, match="base config .*nope.yaml not found"):
        load_config(_write(tmp_path, "base: nope.yaml\n"))
    _write(tmp_path, "base: b.yaml\n", "a.yaml")
    _write(tmp_path, "base: a.yaml\n", "b.yaml")
    with pytest.raises(ConfigError, match="circular 'base' reference"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "dir.yaml").mkdir()
    with pytest.raises(ConfigError, match="dir.yaml: not a file"):
        load_config(tmp_path / "dir.yaml")


def test_bad_override_values_are_one_line(tmp_path):
    p = _write(tmp_path, "data:\n  root: /x\n")
    for item, expected in (("train.lr=[1", "cannot parse the value"), ("model.depth=${nope}", "model.depth"),
                           ("model.depth=${model.depth}", "model.depth")):
        with pytest.raises(ConfigError) as e:
            load_config(p, [item])
        assert expected in str(e.value) and item in str(e.value) and "\n" not in str(e.value)
