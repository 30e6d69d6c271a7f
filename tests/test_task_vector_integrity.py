"""Task vectors carry a content checksum: damage in place (same size) is refused on load."""

import json
import warnings

import numpy as np
import pytest

from llora_jax import task_vectors
from llora_jax import tree as tree_lib


def _trees(seed=0):
    rng = np.random.default_rng(seed)
    tau = {
        "layer_0": {"query": {"lora_a": rng.standard_normal((768, 16)).astype(np.float32)}},
        "layer_1": {"value": {"lora_b": rng.standard_normal((16, 768)).astype(np.float32)}},
    }
    # Random (incompressible) values, as trained adapters have: Orbax stores them in zstd
    # data files, whose damage is not caught by Orbax itself.
    phi0 = {
        k: {
            m: {p: rng.standard_normal(a.shape).astype(np.float32) for p, a in d.items()}
            for m, d in v.items()
        }
        for k, v in tau.items()
    }
    meta = task_vectors.make_meta(
        base_model="toy",
        base_fingerprint="f" * 32,
        adapter_kind="lora",
        mode="lora",
        task="a",
        seed=seed,
        steps=1,
        rank=4,
        alpha=8.0,
    )
    return tau, phi0, meta


def _damage_in_place(folder):
    """Overwrite 8 bytes in the middle of the largest Orbax data file (same size).

    Orbax's OCDBT b-tree nodes carry a CRC, but its zstd data files do not: such damage
    restores silently with other values (seen: the issue's values of 1e37).
    """
    data_files = [p for p in folder.glob("ocdbt.process_*/d/*") if p.is_file()]
    f = max(data_files, key=lambda p: p.stat().st_size)
    data = bytearray(f.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 8] = np.full(2, 1e37, np.float32).tobytes()
    size = f.stat().st_size
    f.write_bytes(bytes(data))
    assert f.stat().st_size == size
    return f


def test_checksum_is_recorded_and_verified(tmp_path):
    tau, phi0, meta = _trees()
    path = task_vectors.save(tmp_path / "tv", tau, meta, phi0=phi0)
    m = json.loads((path / "meta.json").read_text())
    assert m["checksum"] == {
        "algorithm": task_vectors.CHECKSUM_ALGORITHM,
        "tau": tree_lib.fingerprint(tau),
        "phi0": tree_lib.fingerprint(phi0),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a checked vector loads without a warning
        got = task_vectors.load(path)
    assert "checksum_note" not in got.meta


@pytest.mark.parametrize("part", ["tau", "phi0"])
def test_same_size_corruption_in_place_is_detected(tmp_path, part):
    tau, phi0, meta = _trees()
    path = task_vectors.save(tmp_path / "tv", tau, meta, phi0=phi0)
    _damage_in_place(path / part)
    with pytest.raises(task_vectors.TaskVectorError, match=f"{part} does not match the checksum"):
        task_vectors.load(path)


def test_tau_only_vector_and_tau_only_load(tmp_path):
    tau, phi0, meta = _trees()
    path = task_vectors.save(tmp_path / "tv", tau, meta)
    assert json.loads((path / "meta.json").read_text())["checksum"]["phi0"] is None
    assert task_vectors.load(path).phi0 is None
    path2 = task_vectors.save(tmp_path / "tv2", tau, meta, phi0=phi0)
    _damage_in_place(path2 / "phi0")
    # Loading without phi0 does not read (or check) the damaged phi0.
    assert task_vectors.load(path2, with_phi0=False).phi0 is None


def test_old_vectors_without_checksum_load_with_a_note(tmp_path):
    tau, phi0, meta = _trees()
    path = task_vectors.save(tmp_path / "tv", tau, meta, phi0=phi0)
    m = json.loads((path / "meta.json").read_text())
    del m["checksum"]
    (path / "meta.json").write_text(json.dumps(m))
    with pytest.warns(UserWarning, match="no checksum"):
        got = task_vectors.load(path)
    assert "not verified" in got.meta["checksum_note"]
    np.testing.assert_array_equal(
        got.tau["layer_1"]["value"]["lora_b"], tau["layer_1"]["value"]["lora_b"]
    )


def test_unknown_checksum_algorithm_is_refused(tmp_path):
    tau, _, meta = _trees()
    path = task_vectors.save(tmp_path / "tv", tau, meta)
    m = json.loads((path / "meta.json").read_text())
    m["checksum"]["algorithm"] = "md5-v9"
    (path / "meta.json").write_text(json.dumps(m))
    with pytest.raises(task_vectors.TaskVectorError, match="unknown checksum algorithm"):
        task_vectors.load(path)


def test_unreadable_orbax_folder_is_a_task_vector_error(tmp_path):
    tau, _, meta = _trees()
    path = task_vectors.save(tmp_path / "tv", tau, meta)
    for f in (path / "tau").rglob("*"):
        if f.is_file() and f.name != "_METADATA":
            f.write_bytes(b"")
    with pytest.raises(task_vectors.TaskVectorError, match="could not be read.*damaged"):
        task_vectors.load(path)
