"""The README's Python API snippet runs as printed, from the repository root, on a fresh checkout."""
from __future__ import annotations

import re
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def readme_api_snippet() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the README's Python API section should hold exactly one python block"
    return blocks[0]


def test_readme_python_api_runs(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SYMDIFF_CACHE", str(tmp_path / "cache"))  # a fresh user's empty cache
    monkeypatch.chdir(REPO)
    torch.manual_seed(0)
    ns: dict = {}
    exec(compile(readme_api_snippet(), "README.md (Python API)", "exec"), ns)

    B = ns["batch"].mask.shape[0]
    assert B == 8 and ns["cfg"].model.depth == 2
    assert ns["loss"].ndim == 0 and torch.isfinite(ns["loss"]) and ns["loss"] > 0
    assert ns["nll"].shape == (B,) and torch.isfinite(ns["nll"]).all()
    R = ns["R"]
    assert R.shape == (B, 3, 3)
    assert torch.allclose(R @ R.transpose(1, 2), torch.eye(3).expand(B, 3, 3), atol=1e-5)
    z = ns["z"]
    assert ns["eps_hat"].shape == z.shape and ns["z_s"].shape == z.shape and torch.isfinite(ns["z_s"]).all()
    eps_q = ns["eps_q"]
    assert eps_q.shape == z.shape and torch.isfinite(eps_q).all() and not torch.equal(eps_q, torch.zeros_like(z))
    x, Z, mask = ns["x"], ns["Z"], ns["mask"]
    assert x.shape == (2, 12, 3) and mask.sum(1).tolist() == [9, 12] and bool((Z[mask] > 0).all())
    assert len(ns["mols"]) == 4
    # the bundled shards came from the user's cache, whatever the checkout holds under runs/
    assert Path(str(ns["cfg"].data.root)).parent == tmp_path / "cache" / "bundled"
