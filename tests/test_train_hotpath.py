"""The training step's GPU-ready pieces, on CPU: the non-finite guard decided on the device, the per-step statistics
reduced without reading them back at once, and the next batch fetched ahead without moving the loader's recorded
state (tests/test_train_distributed.py checks the whole loop resumes bitwise with them)."""
from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist

from symdiff.train import step_stats
from symdiff.train.prefetch import Prefetcher
from symdiff.train.trainer import compute_loss, split_batch


class _Engine:
    """What compute_loss needs of DeepSpeed's engine: forward(batch) -> (loss, stats)."""

    def __init__(self, w: torch.Tensor, scale: float) -> None:
        self.w, self.scale = w, scale

    def __call__(self, micro):
        return (self.w ** 2).sum() * self.scale, {}


@pytest.mark.parametrize("scale", [1.0, float("inf"), float("nan")])
def test_compute_loss_keeps_finite_losses_to_the_bit_and_poisons_the_rest(scale):
    w = torch.tensor([0.3, -1.7, 2.2], requires_grad=True)
    loss, _ = compute_loss(_Engine(w, scale), None, 1)
    (g,) = torch.autograd.grad(loss, w)
    if scale == 1.0:
        plain = (w ** 2).sum()
        assert torch.equal(loss, plain) and torch.equal(g, torch.autograd.grad(plain, w)[0])
    else:  # NaN loss and NaN gradients: the optimizer's overflow check skips the step
        assert torch.isnan(loss) and torch.isnan(g).all()


@pytest.fixture(scope="module")
def gloo_group():
    if dist.is_initialized():
        yield
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_reduced_statistics_equal_the_host_sum_bit_for_bit(gloo_group):
    losses = [torch.tensor(v, dtype=torch.float32) for v in (0.1234567, 3.3e-4, 17.25)]
    host_sum = 0.0
    dev_sum = torch.zeros((), dtype=torch.float64)
    for x in losses:  # the trainer's old python-float sum, and its new device sum
        host_sum += float(x)
        dev_sum += x.double()
    res = step_stats.reduce_stats(dev_sum, [3, 64, 1100.0, 1856.0], torch.device("cpu")).result()
    assert res.dtype == torch.float64 and res.tolist() == [host_sum, 3, 64, 1100.0, 1856.0]
    extra = torch.tensor([0.25, 1.5], dtype=torch.float64)  # the process's statistics ride along at the end
    res = step_stats.reduce_stats(dev_sum, [3, 64], torch.device("cpu"), extra).result()
    assert res.tolist() == [host_sum, 3, 64, 0.25, 1.5]


def test_pending_statistics_wait_on_their_own_event_once():
    class Event:
        waits = 0

        def synchronize(self):
            Event.waits += 1

    host = torch.arange(3.0)
    pending = step_stats.PendingStats(host, Event())
    assert pending.result() is host and pending.result() is host
    assert Event.waits == 1


def test_prefetch_yields_the_loaders_batches_with_the_state_after_each():
    from symdiff.data.bundled import ensure_bundled_shards
    from symdiff.data.loader import ShardLoader

    root = ensure_bundled_shards()
    make = lambda: ShardLoader(root, "valid", batch_size=400, shuffle=True, seed=3)  # noqa: E731  4 batches an epoch
    plain, states = [], []
    loader = make()
    for _ in range(2):  # two epochs, read the ordinary way
        for b in loader:
            plain.append(b)
            states.append(loader.state_dict())
    fetch = Prefetcher(make(), torch.device("cpu"), lambda b: split_batch(b, 2))
    got = [fetch.next() for _ in range(len(plain))]
    ahead = [fetch.next() for _ in range(1)]  # one more, as the trainer fetches ahead: the recorded states stay
    assert len(plain) == 8 and ahead
    for f, b, s in zip(got, plain, states):
        assert torch.equal(f.batch.mol_ids, b.mol_ids) and f.loader_state == s
        assert torch.equal(torch.cat([m.mol_ids for m in f.micros]).sort().values, b.mol_ids.sort().values)
    assert got[3].loader_state["epoch"] == 0 and got[4].loader_state == {**states[4]} and states[4]["epoch"] == 1
    # a loader restored to a recorded state continues where that batch left off
    resumed = make()
    resumed.load_state_dict(got[5].loader_state)
    assert torch.equal(Prefetcher(resumed, torch.device("cpu"), lambda b: [b]).next().batch.mol_ids, plain[6].mol_ids)
