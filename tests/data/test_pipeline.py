"""Batching: determinism, multi-process shards, padding weights, resume, prefetch."""

import numpy as np
import pytest

from llora_jax import data


def arrays(n=23):
    return {
        "x": np.arange(n, dtype=np.int32) * 10,
        "y": np.arange(n, dtype=np.float32)[:, None].repeat(3, 1),
    }


def collect(it):
    return [{k: v.copy() for k, v in b.items()} for b in it]


def kw(**extra):
    return {"process_index": 0, "process_count": 1, **extra}


def test_same_seed_same_batches_other_seed_other_order():
    a = collect(data.batches(arrays(), 4, seed=7, epochs=2, **kw()))
    b = collect(data.batches(arrays(), 4, seed=7, epochs=2, **kw()))
    c = collect(data.batches(arrays(), 4, seed=8, epochs=2, **kw()))
    assert len(a) == 2 * (23 // 4)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u["x"], v["x"])
    assert any(not np.array_equal(u["x"], v["x"]) for u, v in zip(a, c))
    # epochs reshuffle: the two epochs differ in order
    assert not np.array_equal(
        np.concatenate([u["x"] for u in a[:5]]), np.concatenate([u["x"] for u in a[5:]])
    )
    # fields stay aligned
    for u in a:
        np.testing.assert_array_equal(u["y"][:, 0] * 10, u["x"])


def test_no_shuffle_keeps_order_and_pads_remainder_with_zero_weight():
    out = collect(data.batches(arrays(10), 4, shuffle=False, drop_remainder=False, **kw()))
    assert [len(b["x"]) for b in out] == [4, 4, 4]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in out])[:10], np.arange(10) * 10)
    assert out[-1]["weight"].tolist() == [1, 1, 0, 0]
    assert out[-1]["weight"].dtype == np.float32
    assert sum(b["weight"].sum() for b in out) == 10


@pytest.mark.parametrize("drop", [True, False])
def test_processes_get_disjoint_shards_that_cover_the_split(drop):
    n, bs, procs = 37, 8, 4
    per = [
        collect(
            data.batches(
                arrays(n), bs, seed=3, drop_remainder=drop, process_index=p, process_count=procs
            )
        )
        for p in range(procs)
    ]
    assert len({len(b) for b in per}) == 1  # same number of steps everywhere
    seen = []
    for p_batches in per:
        for b in p_batches:
            assert len(b["x"]) == bs // procs
            seen.extend(b["x"][b["weight"] > 0].tolist())
    assert len(seen) == len(set(seen))  # disjoint
    if drop:
        assert len(seen) == (n // bs) * bs
    else:
        assert sorted(seen) == (np.arange(n) * 10).tolist()  # cover
    # the union of one step over processes is the single-process global batch
    single = collect(data.batches(arrays(n), bs, seed=3, drop_remainder=drop, **kw()))
    for step in range(len(single)):
        glued = np.concatenate([per[p][step]["x"] for p in range(procs)])
        np.testing.assert_array_equal(glued, single[step]["x"])


def test_infinite_iterator_and_resume_from_step():
    it = data.batches(arrays(), 4, seed=1, epochs=None, **kw())
    first = [next(it)["x"].copy() for _ in range(17)]  # crosses 3 epochs of 5 steps
    resumed = data.batches(arrays(), 4, seed=1, epochs=None, start_step=11, **kw())
    for k in range(6):
        np.testing.assert_array_equal(next(resumed)["x"], first[11 + k])


def test_taskdata_transform_and_threads_match_sequential():
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in [(9, 12), (20, 7)] * 6]

    class Rows:
        def __len__(self):
            return len(imgs)

        def take(self, idx):
            return {"image": [imgs[i] for i in idx], "label": np.asarray(idx, np.int64)}

    tf = data.image_transform(8)
    seq = collect(data.batches(Rows(), 4, seed=2, transform=tf, **kw()))
    par = collect(data.batches(Rows(), 4, seed=2, transform=tf, num_workers=3, **kw()))
    assert len(seq) == 3
    for a, b in zip(seq, par):
        assert a["image"].shape == (4, 8, 8, 3) and a["image"].dtype == np.uint8
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
        for img, lab in zip(a["image"], a["label"]):
            np.testing.assert_array_equal(img, data.resize_center_crop(imgs[lab], 8))
    with pytest.raises(TypeError, match="'image'.*transform"):
        next(data.batches(Rows(), 4, **kw()))


def test_errors():
    with pytest.raises(ValueError, match="multiple of process_count"):
        next(data.batches(arrays(), 6, process_index=0, process_count=4))
    with pytest.raises(ValueError, match="no batch"):
        next(data.batches(arrays(3), 4, **kw()))
    with pytest.raises(ValueError, match="different lengths"):
        next(data.batches({"a": np.zeros(3), "b": np.zeros(4)}, 1, **kw()))


def test_prefetch_to_device_with_sharding():
    import jax

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    host = collect(data.batches(arrays(), 4, seed=5, **kw()))
    dev = list(data.prefetch_to_device(data.batches(arrays(), 4, seed=5, **kw()), 2, sharding))
    assert len(dev) == len(host)
    for h, d in zip(host, dev):
        assert isinstance(d["x"], jax.Array) and d["x"].sharding == sharding
        np.testing.assert_array_equal(np.asarray(d["y"]), h["y"])
    # strings stay on the host; producer errors reach the consumer
    mixed = list(data.prefetch_to_device([{"s": np.array(["a"], object), "v": np.ones(1)}]))
    assert mixed[0]["s"][0] == "a" and isinstance(mixed[0]["v"], jax.Array)

    def broken():
        yield {"v": np.ones(1)}
        raise RuntimeError("reader failed")

    it = data.prefetch_to_device(broken())
    next(it)
    with pytest.raises(RuntimeError, match="reader failed"):
        next(it)
    # stopping early does not hang
    gen = data.prefetch_to_device(data.batches(arrays(), 1, epochs=None, **kw()), size=1)
    next(gen)
    gen.close()


_WORKER = r"""
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{sys.argv[1]}", num_processes=2, process_id=int(sys.argv[2]))
import numpy as np
from jax.experimental import multihost_utils
from llora_jax import data

mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
arrays = {"x": np.arange(23, dtype=np.int32) * 10}
out = []
for b in data.prefetch_to_device(data.batches(arrays, 4, seed=3, drop_remainder=False), 2, sharding):
    assert b["x"].shape == (4,) and not b["x"].is_fully_addressable
    total = int(jax.jit(lambda x, w: (x * w).sum())(b["x"], b["weight"]))
    full = multihost_utils.process_allgather(b["x"], tiled=True)
    out.append([np.asarray(full).tolist(), total])
print("RESULT" + json.dumps(out))
jax.distributed.shutdown()
"""


def test_two_processes_build_global_batches(tmp_path):
    import json
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(port), str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    results = [json.loads(o.split("RESULT")[1].splitlines()[0]) for o in outs]
    assert results[0] == results[1]
    single = collect(
        data.batches({"x": np.arange(23) * 10}, 4, seed=3, drop_remainder=False, **kw())
    )
    assert len(results[0]) == len(single) == 6
    for (full, total), b in zip(results[0], single):
        assert full == b["x"].tolist()  # process slices assemble into the global batch
        assert total == int((b["x"] * b["weight"]).sum())
