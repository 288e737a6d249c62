"""ds.loader() in a real two-process gloo job: ranks from torch.distributed, disjoint
shares, and a rank-0 checkpoint resumed by a job of another world size."""

from __future__ import annotations

import collections
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

from edcache import CachedDataset  # noqa: E402

from test_loader import Dicts  # noqa: E402

N = 103

WORKER = textwrap.dedent("""
    import json, os, sys
    import torch.distributed as dist
    from edcache import CachedDataset
    root, name, out, state_in, steps = sys.argv[1:6]
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + os.environ["PORT"],
                            rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD"]))
    ds = CachedDataset.from_cache(root, name)
    loader = ds.loader(5, shuffle=True, seed=7, num_workers=1)
    assert (loader.rank, loader.world_size) == (dist.get_rank(), dist.get_world_size())
    if state_in != "-":
        loader.load_state_dict(json.load(open(state_in)))
    seen, state = [], None
    for k, batch in enumerate(loader):
        seen.append(batch["label"].tolist())
        dist.barrier()  # lockstep, as a DDP step would be
        if k + 1 == int(steps):
            state = loader.state_dict()
            break
    json.dump({"seen": seen, "state": state}, open(out % dist.get_rank(), "w"))
    dist.destroy_process_group()
""")


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _job(tmp_path, world, state_in, steps, tag):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = str(_port())
    out = str(tmp_path / f"{tag}-%d.json")
    env = {**os.environ, "PORT": port, "WORLD": str(world)}
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path), "dicts", out, state_in, str(steps)],
                              env={**env, "RANK": str(r)}) for r in range(world)]
    try:
        for p in procs:
            assert p.wait(timeout=240) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [json.load(open(out % r)) for r in range(world)]


def test_two_process_gloo_job_and_elastic_resume(tmp_path):
    CachedDataset(Dicts(tmp_path), chunk_size=16, num_workers=0, progress=False)
    first = _job(tmp_path, 2, "-", 3, "a")  # 3 steps of 2 x 5
    a = [{i for b in r["seen"] for i in b} for r in first]
    assert not a[0] & a[1] and len(a[0] | a[1]) == 30
    state = tmp_path / "state.json"
    state.write_text(json.dumps(first[0]["state"]))
    assert first[0]["state"]["examples_consumed"] == 30
    rest = _job(tmp_path, 3, str(state), 10 ** 6, "b")  # the rest of the epoch at world size 3
    counts = collections.Counter(i for r in first + rest for b in r["seen"] for i in b)
    assert set(counts) == set(range(N))
    left = N - 30
    assert sum(counts.values()) == N + (-(left % 15)) % 3  # only the documented padding
    order = np.random.default_rng([7, 0]).permutation(N).tolist()
    assert rest[0]["seen"][0] == order[30:35] and rest[2]["seen"][0] == order[40:45]
