"""MetricsLog: JSONL rows and TensorBoard events, read back independently of tensorboardX's writer."""

import json
import struct
import subprocess
import sys

import numpy as np
import pytest

from llora_jax.train.metrics_log import MetricsLog

event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2")


def _crc32c(data: bytes) -> int:
    """CRC-32C from its definition: reflected Castagnoli polynomial, init and final xor all ones."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = _crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _read_records(path) -> list[bytes]:
    """TFRecord framing: u64 length, u32 masked crc(length), data, u32 masked crc(data); LE."""
    buf, pos, out = path.read_bytes(), 0, []
    while pos < len(buf):
        header = buf[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        (len_crc,) = struct.unpack("<I", buf[pos + 8 : pos + 12])
        assert len_crc == _masked_crc(header), f"bad length crc in {path}"
        data = buf[pos + 12 : pos + 12 + length]
        (data_crc,) = struct.unpack("<I", buf[pos + 12 + length : pos + 16 + length])
        assert len(data) == length and data_crc == _masked_crc(data), f"bad data crc in {path}"
        out.append(data)
        pos += 16 + length
    assert pos == len(buf)
    return out


def _scalars(workdir) -> set[tuple[str, int, float]]:
    files = sorted((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert files, "no event file written"
    got = set()
    for f in files:
        events = [event_pb2.Event.FromString(r) for r in _read_records(f)]
        assert events[0].file_version == "brain.Event:2"
        for ev in events:
            got |= {(v.tag, ev.step, v.simple_value) for v in ev.summary.value}
    return got


def _jsonl(workdir) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_crc32c_check_value():
    assert _crc32c(b"123456789") == 0xE3069283  # the standard CRC-32C check value


def test_round_trip_tensorboard_and_jsonl(tmp_path):
    rows = [
        {"step": 10, "loss": 0.75, "grad_norm": np.float32(1.5), "examples_per_s": 123},
        {"step": 20, "loss": np.float64(0.1), "val/accuracy": np.array(0.875)},
        {"step": 20, "test/f1": 0.3, "n": np.int64(7)},
    ]
    with MetricsLog(tmp_path) as log:
        for row in rows:
            log.write(row)
    f32 = lambda x: float(np.float32(x))  # noqa: E731  (simple_value is a float32)
    assert _scalars(tmp_path) == {
        ("loss", 10, 0.75),
        ("grad_norm", 10, 1.5),
        ("examples_per_s", 10, 123.0),
        ("loss", 20, f32(0.1)),
        ("val/accuracy", 20, 0.875),
        ("test/f1", 20, f32(0.3)),
        ("n", 20, 7.0),
    }
    assert _jsonl(tmp_path) == [{k: float(v) for k, v in r.items()} for r in rows]
    assert [type(r["step"]) for r in _jsonl(tmp_path)] == [int, int, int]


def test_resume_appends_both_runs(tmp_path):
    with MetricsLog(tmp_path) as log:
        log.write({"step": 1, "loss": 2.0})
    with MetricsLog(tmp_path) as log:  # resumed run: same workdir, opened within the same second
        log.write({"step": 2, "loss": 1.0})
        log.flush()
        assert ("loss", 2, 1.0) in _scalars(tmp_path)  # flush makes events readable before close
    assert _jsonl(tmp_path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}]
    assert len(list((tmp_path / "tensorboard").iterdir())) == 2
    assert _scalars(tmp_path) == {("loss", 1, 2.0), ("loss", 2, 1.0)}


def test_disabled_creates_nothing(tmp_path):
    workdir = tmp_path / "run"
    with MetricsLog(workdir, enabled=False) as log:
        log.write({"step": 1, "loss": 1.0})
        log.flush()
    log.write({"step": 2})  # a no-op even after close
    assert not workdir.exists()


def test_non_scalars_kept_in_jsonl_only(tmp_path):
    row = {"step": 3, "loss": 0.5, "per_task": [0.25, 0.5], "name": "cola", "x": None}
    with MetricsLog(tmp_path) as log:
        log.write(row)
    assert _jsonl(tmp_path) == [row]
    assert _scalars(tmp_path) == {("loss", 3, 0.5)}


def test_errors(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=False)
    with pytest.raises(KeyError, match="step"):
        log.write({"loss": 1.0})
    log.close()
    with pytest.raises(RuntimeError, match="closed"):
        log.write({"step": 1})
    assert not (tmp_path / "tensorboard").exists()


def test_without_tensorboardx(tmp_path):
    # A fresh interpreter where tensorboardX cannot be imported: the module imports, JSONL-only
    # logging works, and asking for TensorBoard says how to fix it.
    code = f"""
import sys
sys.modules["tensorboardX"] = None
from llora_jax.train.metrics_log import MetricsLog
with MetricsLog({str(tmp_path)!r}, tensorboard=False) as log:
    log.write({{"step": 1, "loss": 1.0}})
try:
    MetricsLog({str(tmp_path)!r})
except ImportError as e:
    assert "pip install tensorboardX" in str(e) and "tensorboard=False" in str(e), e
else:
    raise AssertionError("no ImportError")
"""
    subprocess.run([sys.executable, "-c", code], check=True)
    assert _jsonl(tmp_path) == [{"step": 1, "loss": 1.0}]
    assert not (tmp_path / "tensorboard").exists()
