"""ds.loader(): batches, deterministic order, exact resume, DDP partitioning, elastic resume."""

from __future__ import annotations

import collections
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edcache import CachedDataset  # noqa: E402
from edcache.loader import CacheLoader  # noqa: E402

N = 103  # not a multiple of any batch size or world size used below


class Dicts:
    """Dict examples: an image, an int, a float, a str."""

    name = "dicts"

    def __init__(self, root, n=N):
        self.root, self.n = str(root), n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"image": np.full((4, 3), i % 251, np.uint8), "label": i, "x": i / 2, "s": f"ex-{i}"}


class Tuples(Dicts):
    name = "tuples"

    def __getitem__(self, i):
        return (np.arange(3, dtype=np.float32) + i, i, f"t-{i}")


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return CachedDataset(Dicts(tmp_path_factory.mktemp("loader")), chunk_size=16, num_workers=0, progress=False)


@pytest.fixture(scope="module")
def tds(tmp_path_factory):
    return CachedDataset(Tuples(tmp_path_factory.mktemp("loader_t")), chunk_size=16, num_workers=0,
                         progress=False)


def plain(batch):
    """A batch as comparable Python values."""
    if isinstance(batch, dict):
        return {k: plain(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(plain(v) for v in batch)
    if isinstance(batch, torch.Tensor):
        return (str(batch.dtype), batch.tolist())
    return batch


def ids(batch):
    return batch["label"].tolist()


def take(loader, k):
    """The first ``k`` batches of passes over ``loader`` (crossing epochs)."""
    out = []
    while len(out) < k:
        before = len(out)
        for b in loader:
            out.append(plain(b))
            if len(out) == k:
                break
        if len(out) == before and k:
            raise AssertionError("an epoch without batches")
    return out


def test_batches_equal_a_plain_dataloader_over_the_same_order(ds):
    from torch.utils.data import DataLoader

    loader = ds.loader(10, shuffle=True, seed=3)
    got = [plain(b) for b in loader]
    order = np.random.default_rng([3, 0]).permutation(N)
    batches = [order[i:i + 10].tolist() for i in range(0, N, 10)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = [plain(b) for b in DataLoader(ds, batch_sampler=batches)]
    assert got == want
    assert len(loader) == len(got) == 11
    first = next(iter(ds.loader(4)))
    assert first["image"].dtype == torch.uint8 and first["image"].shape == (4, 4, 3)
    assert first["s"] == ["ex-0", "ex-1", "ex-2", "ex-3"] and first["index_"].tolist() == [0, 1, 2, 3]
    assert first["x"].dtype == torch.float64


@pytest.mark.parametrize("shuffle", [False, True])
def test_order_does_not_depend_on_workers(ds, shuffle):
    runs = [take(ds.loader(8, shuffle=shuffle, seed=5, num_workers=w), 2 * 13) for w in (0, 1, 2)]
    assert runs[0] == runs[1] == runs[2]
    epoch0, epoch1 = runs[0][:13], runs[0][13:]
    assert sorted(i for b in epoch0 for i in b["label"][1]) == list(range(N))
    assert (epoch0 == epoch1) == (not shuffle)  # a new permutation per epoch when shuffled
    other = take(ds.loader(8, shuffle=True, seed=6), 13)
    assert not shuffle or other != epoch0


def test_len_and_drop_last(ds):
    assert len(ds.loader(10)) == 11 and len(ds.loader(10, drop_last=True)) == 10
    assert [len(b["label"]) for b in ds.loader(10)][-1] == 3
    assert [len(b["label"]) for b in ds.loader(10, drop_last=True)] == [10] * 10
    assert len(ds.loader(200)) == 1 and len(ds.loader(200, drop_last=True)) == 0
    assert list(ds.loader(200, drop_last=True)) == []
    assert len(ds.loader(10, rank=1, world_size=4)) == 3  # 103 = 2 full steps of 40 + 23 left
    assert len(ds.loader(10, rank=1, world_size=4, drop_last=True)) == 2


@pytest.mark.parametrize("ctx", ["fork", "spawn"])
def test_resume_is_exact(ds, ctx):
    per_epoch = 13  # ceil(103 / 8)
    reference = take(ds.loader(8, shuffle=True, seed=11), 2 * per_epoch)
    points = [0, 1, 6, per_epoch - 1, per_epoch, per_epoch + 1] if ctx == "fork" else [6, per_epoch]
    for k in points:
        first = ds.loader(8, shuffle=True, seed=11, num_workers=2, multiprocessing_context=ctx,
                          prefetch_factor=4)
        got = take(first, k) if k else []
        state = first.state_dict()
        del first
        resumed = ds.loader(8, shuffle=True, seed=11, num_workers=2 if ctx == "spawn" else 0,
                            multiprocessing_context=ctx if ctx == "spawn" else None)
        resumed.load_state_dict(state)
        got += take(resumed, 2 * per_epoch - k)
        assert got == reference, k


def test_state_follows_epochs_and_set_epoch(ds):
    loader = ds.loader(50)
    assert loader.state_dict()["epoch"] == 0 and len(loader) == 3
    it = iter(loader)
    next(it)
    assert loader.state_dict()["examples_consumed"] == 50
    next(it), next(it)
    assert (loader.state_dict()["epoch"], loader.state_dict()["examples_consumed"]) == (1, 0)
    with pytest.raises(StopIteration):
        next(it)
    # a pass left mid-epoch: the next pass is the next epoch (as a DataLoader starts afresh)
    shuffled = ds.loader(50, shuffle=True)
    next(iter(shuffled))
    assert [b["label"].tolist() for b in shuffled] == [
        b["label"].tolist() for b in _at_epoch(ds.loader(50, shuffle=True), 1)]
    assert shuffled.epoch == 2
    # set_epoch of the epoch in progress keeps a loaded state; another epoch starts it afresh
    mid = ds.loader(10, shuffle=True)
    mid.load_state_dict({**mid.state_dict(), "epoch": 4, "examples_consumed": 30})
    mid.set_epoch(4)
    assert len(list(mid)) == 8 and mid.epoch == 5
    mid.set_epoch(2)
    again = _at_epoch(ds.loader(10, shuffle=True), 2)
    assert [b["label"].tolist() for b in mid] == [b["label"].tolist() for b in again]


def _at_epoch(loader, e):
    loader.set_epoch(e)
    return list(loader)


def test_load_state_dict_refuses_another_order(ds):
    state = ds.loader(8, shuffle=True, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed"):
        ds.loader(8, shuffle=True, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="num_examples"):
        ds.subset(np.arange(10)).loader(8, shuffle=True, seed=1).load_state_dict(state)
    with pytest.raises(ValueError):
        ds.loader(8, shuffle=True, seed=1).load_state_dict({**state, "examples_consumed": N + 1})
    with pytest.raises(TypeError, match="batch_size"):
        ds.loader(8, sampler=[0])
    with pytest.raises(TypeError, match="in_order"):
        ds.loader(8, in_order=False)  # batches out of order would break the resume count


def test_an_unused_iterator_moves_nothing(ds):
    loader = ds.loader(50, shuffle=True)
    iter(loader), iter(loader)
    assert loader.epoch == 0 and [b["label"].tolist() for b in loader] == [
        b["label"].tolist() for b in _at_epoch(ds.loader(50, shuffle=True), 0)]


def _ranks(ds, world, batch, **kw):
    return [ds.loader(batch, rank=r, world_size=world, **kw) for r in range(world)]


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("drop_last", [False, True])
def test_ddp_ranks_partition_each_epoch(ds, world, drop_last):
    loaders = _ranks(ds, world, 6, shuffle=True, seed=2, drop_last=drop_last)
    for epoch in range(2):
        per_rank = [[b["label"].tolist() for b in L] for L in loaders]
        assert all(len(p) == len(loaders[0]) for p in per_rank)  # lockstep: same number of batches
        seen = collections.Counter(i for p in per_rank for b in p for i in b)
        step = world * 6
        if drop_last:
            assert sum(seen.values()) == (N // step) * step and max(seen.values()) == 1
        else:
            assert set(seen) == set(range(N))
            padded = sum(seen.values()) - N
            assert 0 <= padded < world and (padded == 0) == ((N % step) % world == 0)
            last_sizes = {len(p[-1]) for p in per_rank}
            assert len(last_sizes) == 1  # the last step is split evenly
        # ranks' batches of one step are disjoint blocks of the epoch order
        order = np.random.default_rng([2, epoch]).permutation(N).tolist()
        assert per_rank[0][0] == order[:6]
        if world > 1:
            assert per_rank[1][0] == order[6:12]


@pytest.mark.parametrize("new_world", [2, 8, 3])
@pytest.mark.parametrize("steps", [1, 2])
def test_elastic_resume_repeats_and_skips_nothing(ds, new_world, steps):
    n_kw = {"shuffle": True, "seed": 9}
    old = _ranks(ds, 4, 5, **n_kw)
    consumed = collections.Counter()
    iters = [iter(L) for L in old]
    for _ in range(steps):
        for it in iters:
            consumed.update(next(it)["label"].tolist())
    state = old[0].state_dict()  # rank 0's checkpoint
    assert state["examples_consumed"] == steps * 4 * 5 and state["world_size"] == 4
    new = _ranks(ds, new_world, 5, **n_kw)
    for L in new:
        L.load_state_dict(state)
    rest = [[b["label"].tolist() for b in L] for L in new]
    assert len({len(r) for r in rest}) == 1
    for r in rest:
        consumed.update(i for b in r for i in b)
    assert set(consumed) == set(range(N))
    left = N - steps * 20
    pad = -(left % (new_world * 5)) % new_world  # the last step's padding, as documented
    assert sum(consumed.values()) == N + pad
    # the next epoch at the new world size is the uninterrupted run's
    assert [[b["label"].tolist() for b in L] for L in new] == [
        [b["label"].tolist() for b in _at_epoch(L, 1)] for L in _ranks(ds, new_world, 5, **n_kw)]


def test_elastic_resume_with_another_batch_size(ds):
    first = ds.loader(10, shuffle=True, seed=4, rank=0, world_size=2)
    it = iter(first)
    next(it), next(it)
    state = first.state_dict()  # 2 steps of 20
    rest = [ds.loader(7, shuffle=True, seed=4, rank=r, world_size=3) for r in range(3)]
    for L in rest:
        L.load_state_dict(state)
    order = np.random.default_rng([4, 0]).permutation(N).tolist()
    got = sorted(i for L in rest for b in L for i in b["label"].tolist())
    assert sorted(set(got)) == sorted(order[40:])


def test_distributed_defaults_without_a_process_group(ds):
    loader = ds.loader(8)
    assert (loader.rank, loader.world_size) == (0, 1)
    with pytest.raises(ValueError, match="rank"):
        ds.loader(8, rank=2, world_size=2)


def test_tuple_examples(tds):
    batches = list(tds.loader(4, num_workers=2))
    assert len(batches) == len(tds.loader(4)) == 26
    first = batches[0]
    assert isinstance(first, tuple) and len(first) == 3
    assert first[0].dtype == torch.float32 and first[0].tolist()[1] == [1.0, 2.0, 3.0]
    assert first[1].tolist() == [0, 1, 2, 3] and first[2] == ["t-0", "t-1", "t-2", "t-3"]
    assert [len(b[1]) for b in batches][-1] == 3
    view = tds.subset([7, 3])
    assert plain(next(iter(view.loader(2)))) == plain((torch.tensor([[7., 8, 9], [3, 4, 5]]),
                                                      torch.tensor([7, 3]), ["t-7", "t-3"]))


def test_subset_views(ds):
    view = ds.subset(np.arange(0, N, 2))
    got = [plain(b) for b in view.loader(5, shuffle=True, seed=1, num_workers=2)]
    order = np.random.default_rng([1, 0]).permutation(len(view))
    assert [i for b in got for i in b["index_"][1]] == order.tolist()  # positions in the view
    assert [i for b in got for i in b["label"][1]] == view.indices[order].tolist()
    assert got[0]["s"] == [f"ex-{i}" for i in view.indices[order[:5]].tolist()]


def test_expand_and_append_labels_fall_back_per_example(ds):
    view = ds.subset(np.arange(6))
    view.append_labels = True
    b = next(iter(view.loader(3)))
    assert b["label"].tolist() == [0, 1, 2] and len(b["labels_"]) == 3


def test_pin_memory_smoke(ds):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no accelerator here: DataLoader turns pinning off
        batches = list(ds.loader(32, pin_memory=True, num_workers=1))
    assert sum(len(b["label"]) for b in batches) == N
    # what the pin-memory thread calls on a worker's batch
    from edcache.loader import BatchReader

    raw = BatchReader(ds)[np.arange(3)]
    if torch.cuda.is_available():
        assert raw.pin_memory()["image"].is_pinned()
    else:
        assert raw.to_torch()["label"].tolist() == [0, 1, 2]


def test_persistent_workers_across_epochs(ds):
    loader = ds.loader(16, shuffle=True, num_workers=2, persistent_workers=True)
    assert take(loader, 14) == take(ds.loader(16, shuffle=True), 14)


def test_numpy_integer_indices(ds):
    for i in (np.int64(5), np.int32(-1), np.uint8(7)):
        assert ds[i]["label"] == ds[int(i)]["label"] and ds[i]["index_"] == ds[int(i)]["index_"]
    assert [e["label"] for e in ds.__getitems__(np.array([3, 1]))] == [3, 1]
    assert [e["label"] for e in ds.__getitems__([np.int64(3), 1])] == [3, 1]
    assert ds.get_batch([np.int64(4), np.int16(2)])["label"].tolist() == [4, 2]
    view = ds.subset([10, 20, 30])
    assert view[np.int64(1)]["label"] == 20 and view[np.int64(1)]["index_"] == 1
    assert view.get_batch([np.int64(2)])["label"].tolist() == [30]
    assert [e["label"] for e in view.__getitems__(np.array([2, 0]))] == [30, 10]
    with pytest.raises(TypeError):
        ds.get_batch([1.5])
    with pytest.raises(IndexError):
        ds[np.int64(N)]


def test_import_edcache_does_not_import_torch():
    import subprocess

    code = "import sys, edcache, edcache.loader; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_loader_is_a_cacheloader(ds):
    assert isinstance(ds.loader(4), CacheLoader) and "batch_size=4" in repr(ds.loader(4))


def test_large_batches_leave_workers_as_shared_memory_tensors(ds, monkeypatch):
    """Above loader.SHARED_MEMORY_BYTES a worker sends tensors (shared memory) instead of
    numpy arrays through its pipe: the batches are the same either way."""
    import edcache.loader as loader_module

    reference = take(ds.loader(8, shuffle=True, seed=3, num_workers=2), 13)
    monkeypatch.setattr(loader_module, "SHARED_MEMORY_BYTES", 0)  # every batch (fork inherits it)
    assert take(ds.loader(8, shuffle=True, seed=3, num_workers=2), 13) == reference
