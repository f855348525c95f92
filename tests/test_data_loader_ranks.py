"""ShardLoader at scale: a rank reads only its own molecules, bytes fall as 1/W, order as on one rank."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import symdiff.data.loader as L
import symdiff.data.shard_reader as SR
from symdiff.data.bundled import ensure_bundled_shards
from symdiff.data.molecules import MoleculeSet
from symdiff.data.shards import write_dataset

KW = [dict(batch_size=48), dict(batch_size=0, max_atoms_per_batch=900)]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return ensure_bundled_shards(tmp_path_factory.mktemp("bundled") / "qm9")


def _loader(root, **kw):
    kw.setdefault("chunk_size", 100)
    kw.setdefault("window_chunks", 7)
    kw.setdefault("seed", 4)
    return L.ShardLoader(root, "train", **kw)


def _record(monkeypatch) -> list[tuple]:
    """Every read the loader makes, as (shard, run starts, run stops): see _indices."""
    asked: list[tuple] = []
    real = L.read_runs

    def recording(shard, starts, stops):
        asked.append((shard, np.asarray(starts), np.asarray(stops)))
        return real(shard, starts, stops)

    monkeypatch.setattr(L, "read_runs", recording)
    return asked


def _indices(loader, asked: list[tuple]) -> np.ndarray:
    """The global molecule indices (the shard's base + the runs' molecules) of the recorded reads."""
    out = [np.zeros(0, np.int64)]
    for shard, starts, stops in asked:
        base = loader.shard_start[loader.shards.index(shard)]
        out += [np.arange(a, b) + base for a, b in zip(starts.tolist(), stops.tolist())]
    return np.concatenate(out)


def _epoch(root, monkeypatch, **kw):
    """(requested global indices, yielded global indices per batch, loader) of one rank's epoch."""
    asked = _record(monkeypatch)
    loader = _loader(root, **kw)
    index = {int(m): i for i, m in enumerate(_all_ids(loader))}
    got = [np.array([index[int(m)] for m in b.mol_ids]) for b in loader]
    return _indices(loader, asked), got, loader


def _all_ids(loader) -> np.ndarray:
    return np.concatenate([SR.read_runs(s, np.array([0]), np.array([s.n_molecules])).mol_ids for s in loader.shards])


@pytest.mark.parametrize("kw", KW)
def test_a_rank_requests_exactly_its_shares_and_ranks_cover_the_epoch_disjointly(root, monkeypatch, kw):
    for world in (1, 2, 4):
        per_rank = []
        for r in range(world):
            asked, got, loader = _epoch(root, monkeypatch, rank=r, world_size=world, **kw)
            assert len(asked) == len(np.unique(asked))  # nothing read twice in an uninterrupted epoch
            shares = np.concatenate([loader._my_share(idx) for idx in loader.global_batches(0)])
            assert np.array_equal(np.sort(asked), np.unique(shares))
            assert np.array_equal(np.sort(asked), np.unique(np.concatenate(got)))  # read = trained on
            per_rank.append(asked)
        small = any(len(b) < world for b in loader.global_batches(0))
        allr = np.concatenate(per_rank)
        assert np.array_equal(np.unique(allr), np.arange(len(loader.sizes)))  # the ranks cover the epoch
        if not small:  # (a batch of fewer molecules than ranks wraps around, by design)
            assert len(allr) == len(loader.sizes)  # and no two ranks read the same molecule


@pytest.mark.parametrize("kw", KW)
def test_world_sizes_1_2_4_give_the_same_global_batches(root, monkeypatch, kw):
    single = [b.mol_ids.numpy() for b in _loader(root, **kw)]
    ref_plan = _loader(root, **kw).global_batches()
    for world in (2, 4):
        loaders = [_loader(root, rank=r, world_size=world, **kw) for r in range(world)]
        assert all(len(a) == len(b) and np.array_equal(a, b) for lo in loaders
                   for a, b in zip(lo.global_batches(), ref_plan))
        ranks = [[b.mol_ids.numpy() for b in lo] for lo in loaders]
        for step, ref in enumerate(single):
            got = np.concatenate([ranks[r][step] for r in range(world)])
            assert set(got.tolist()) == set(ref.tolist()), (world, step)


def test_bytes_read_fall_as_one_over_world_size(root, monkeypatch):
    counted = [0]
    real = SR.os.pread

    def counting(fd, n, offset):
        buf = real(fd, n, offset)
        counted[0] += len(buf)
        return buf

    monkeypatch.setattr(SR.os, "pread", counting)

    def bytes_of(rank, world):
        counted[0] = 0
        for _ in _loader(root, batch_size=48, rank=rank, world_size=world):
            pass
        return counted[0]

    one = bytes_of(0, 1)
    assert one > 0
    for world in (2, 4):
        each = [bytes_of(r, world) for r in range(world)]
        assert sum(each) == one  # every byte read by exactly one rank
        assert max(each) <= 1.1 * one / world


def test_resume_reads_only_the_rest_of_the_window(root, monkeypatch):
    kw = dict(batch_size=40, rank=1, world_size=3)
    ref = _loader(root, **kw)
    ref_batches = list(ref)
    stop = 9  # inside the second window (700 molecules = 17.5 batches per window)
    first = _loader(root, **kw)
    it = iter(first)
    for _ in range(stop):
        next(it)
    state = first.state_dict()
    asked = _record(monkeypatch)
    resumed = _loader(root, **kw)
    resumed.load_state_dict(state)
    rest = next(iter(resumed))
    assert torch.equal(rest.positions, ref_batches[stop].positions)
    window_end = next(i for i, n in enumerate(np.cumsum([len(w) for w in resumed._plan(0)])) if n > stop)
    n_in_window = int(np.cumsum([len(w) for w in resumed._plan(0)])[window_end])
    want = np.unique(np.concatenate([resumed._my_share(b) for b in resumed.global_batches()[stop:n_in_window]]))
    assert np.array_equal(np.sort(_indices(resumed, asked)), want)


def _geom_sizes_set(n: int, seed: int = 0) -> MoleculeSet:
    rng = np.random.default_rng(seed)
    sizes = np.clip(rng.normal(44, 14, n).round().astype(int), 3, 181)
    sizes[:3] = (181, 3, 180)
    zs = [rng.choice([1, 6, 7, 8, 9, 16, 17], s).astype(np.int8) for s in sizes]
    xs = [rng.normal(size=(s, 3)).astype(np.float32) for s in sizes]
    return MoleculeSet.from_lists(zs, xs)


def test_token_budget_at_geom_sizes(tmp_path):
    mols = _geom_sizes_set(3000)
    root = tmp_path / "geom"
    write_dataset(root, "geom", {"train": mols}, shard_size=700)
    budget = 4000
    world = 4
    steps = None
    atoms = np.zeros(world)
    for r in range(world):
        lo = L.ShardLoader(root, "train", batch_size=0, max_atoms_per_batch=budget, rank=r, world_size=world,
                           chunk_size=64, window_chunks=8, seed=1)
        plan = lo.global_batches()
        assert all(int(lo.sizes[b].sum()) <= budget for b in plan) and max(lo.sizes) == 181
        assert np.array_equal(np.sort(np.concatenate(plan)), np.arange(len(mols)))
        batches = list(lo)
        steps = steps or len(batches)
        assert len(batches) == steps == len(plan)
        atoms[r] = sum(int(b.n_atoms.sum()) for b in batches)
    # size-sorted round robin: each rank trains on about a quarter of the atoms
    assert atoms.max() - atoms.min() <= 181 * steps and abs(atoms.sum() - mols.offsets[-1]) < 181 * steps * world


def test_chunked_compressed_shards_read_the_same_molecules(root, tmp_path):
    import shutil

    import h5py

    copy = tmp_path / "chunked"
    shutil.copytree(root, copy)
    for p in (copy / "train").glob("*.h5"):
        with h5py.File(p, "r") as f:
            arrays = {k: f[k][()] for k in f}
            attrs = dict(f.attrs)
        with h5py.File(p, "w") as f:
            f.attrs.update(attrs)
            for k, v in arrays.items():
                f.create_dataset(k, data=v, chunks=True, compression="gzip")
    a = [b.positions for b in _loader(root, batch_size=64, rank=1, world_size=2)]
    b = [b.positions for b in _loader(copy, batch_size=64, rank=1, world_size=2)]
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_a_bad_atom_names_its_shard_in_one_line(tmp_path):
    import h5py

    from symdiff.errors import DataError

    root = tmp_path / "geom"
    write_dataset(root, "geom", {"train": _geom_sizes_set(3000)}, shard_size=700)
    bad = root / "train" / "train-00002.h5"
    with h5py.File(bad, "r+") as f:
        f["atomic_numbers"][5] = 0
    lo = L.ShardLoader(root, "train", batch_size=3000, chunk_size=3000)  # one window across all five shards
    with pytest.raises(DataError, match=f"^{bad}: array 'atomic_numbers': atom 5 has atomic number 0"):
        next(iter(lo))


def test_ids_read_with_the_runs_match_ids_read_up_front(root, monkeypatch):
    kw = dict(batch_size=0, max_atoms_per_batch=900, rank=2, world_size=3)
    up_front = [(b.mol_ids, b.positions) for b in _loader(root, **kw)]
    monkeypatch.setattr(L, "IDS_UP_FRONT_MAX_WORLD", 0)
    lo = _loader(root, **kw)
    assert all(s.mol_ids is None for s in lo.shards)
    with_runs = [(b.mol_ids, b.positions) for b in lo]
    assert len(up_front) == len(with_runs)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(up_front, with_runs))


def test_open_files_stay_bounded(tmp_path, monkeypatch):
    import os

    root = tmp_path / "geom"
    write_dataset(root, "geom", {"train": _geom_sizes_set(600)}, shard_size=50)  # 12 shards
    monkeypatch.setattr(SR, "MAX_OPEN_FILES", 3)
    before = len(os.listdir("/proc/self/fd"))
    lo = L.ShardLoader(root, "train", batch_size=40, chunk_size=10, window_chunks=4, seed=2)
    peak = 0
    ids = []
    for b in lo:
        ids.append(b.mol_ids.numpy())
        peak = max(peak, len(os.listdir("/proc/self/fd")) - before)
    assert peak <= 3 and sorted(np.concatenate(ids).tolist()) == list(range(600))
