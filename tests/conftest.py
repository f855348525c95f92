"""Test-wide settings. TRITON_INTERPRET must be set before anything imports triton (STACK.md §2)."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(REPO / ".cache" / "inductor"))
os.environ.setdefault("TRITON_CACHE_DIR", str(REPO / ".cache" / "triton"))
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Configs naming bundled:qm9 build its shards into the user's cache on first use: keep the tests' copy in the checkout.
os.environ.setdefault("SYMDIFF_CACHE", str(REPO / ".cache" / "symdiff"))

import pytest  # noqa: E402

SHARED = Path(os.environ.get("SYMDIFF_SHARED", REPO.parent / "shared"))
SHARED_DATA = SHARED / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The full real data beside the checkout (../shared/data); tests that need it skip, saying so, without it."""
    if not (SHARED_DATA / "qm9" / "qm9.npz").is_file():
        pytest.skip(f"full real data not found at {SHARED_DATA} (set SYMDIFF_SHARED)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


def pytest_addoption(parser) -> None:
    # The GPU suite runs the kernel tests with the fused ops on CUDA (tests/kernel_device.py).
    parser.addoption("--kernel-device", default=None, help="run the fused kernels on this device (e.g. cuda)")
    parser.addoption("--kernel-dtype", default="float32", choices=("float32", "bfloat16"),
                     help="with --kernel-device: the dtype the kernels' float32 inputs are cast to")


def pytest_configure(config) -> None:
    device = config.getoption("--kernel-device")
    if device:
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from kernel_device import install

        names = install(device, config.getoption("--kernel-dtype"))
        config.stash[_KERNEL_DEVICE] = f"{device}/{config.getoption('--kernel-dtype')}: {', '.join(names)}"


_KERNEL_DEVICE = pytest.StashKey[str]()


def pytest_report_header(config) -> str | None:
    return f"fused kernels on {config.stash[_KERNEL_DEVICE]}" if _KERNEL_DEVICE in config.stash else None
