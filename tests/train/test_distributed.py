"""The same fine-tune on 1 device, 8 fake devices, 2 processes, and after a SIGKILL."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

from llora_jax import task_vectors

ROOT = Path(__file__).resolve().parents[2]


def _env(devices: int = 1) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT)
    return env


def _train(workdir, devices=1, steps=12, extra=(), wait=True):
    cmd = [
        sys.executable,
        "-m",
        "tests.fixtures.toy_train",
        str(workdir),
        "--steps",
        str(steps),
        *extra,
    ]
    p = subprocess.Popen(
        cmd,
        env=_env(devices),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if not wait:
        return p
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    return out


def _tau(workdir):
    return [
        np.asarray(x) for x in jax.tree.leaves(task_vectors.load(Path(workdir) / "task_vector").tau)
    ]


def _close(a, b, rtol):
    for x, y in zip(a, b):
        scale = max(np.abs(x).max(), 1e-12)
        assert np.abs(x - y).max() <= rtol * scale, np.abs(x - y).max() / scale


def test_one_device_and_eight_fake_devices_agree(tmp_path):
    out = _train(tmp_path / "d8", devices=8)
    assert "devices=8" in out
    _train(tmp_path / "d1", devices=1)
    _close(_tau(tmp_path / "d1"), _tau(tmp_path / "d8"), 1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_the_same_task_vector(tmp_path):
    coord = f"127.0.0.1:{_free_port()}"
    procs = [
        _train(
            tmp_path / "mp",
            extra=("--coordinator", coord, "--num-processes", "2", "--process-id", str(i)),
            wait=False,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert "processes=2" in outs[0]
    _train(tmp_path / "sp")
    _close(_tau(tmp_path / "sp"), _tau(tmp_path / "mp"), 1e-5)


def test_sigkill_then_rerun_resumes_to_the_same_task_vector(tmp_path):
    steps = ("--ckpt-every", "2")
    _train(tmp_path / "ref", steps=40, extra=steps)
    wd = tmp_path / "killed"
    p = _train(wd, steps=40, extra=steps, wait=False)
    ckpts = wd / "checkpoints"
    deadline = time.time() + 300
    # Kill once at least one checkpoint is committed, in the middle of the run.
    while time.time() < deadline and p.poll() is None:
        done = [d for d in ckpts.glob("*") if d.name.isdigit()] if ckpts.exists() else []
        if len(done) >= 2:
            break
        time.sleep(0.05)
    assert p.poll() is None, "the run finished before it could be killed; make it longer"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not (wd / "task_vector").exists()
    out = _train(wd, steps=40, extra=steps)
    assert "done" in out
    _close(_tau(tmp_path / "ref"), _tau(wd), 1e-6)


def _killed(wd, flag, steps, extra=()):
    """Run with a self-SIGKILL flag; check it died by SIGKILL; the checkpoint folders left."""
    p = _train(wd, steps=steps, extra=(*extra, *flag), wait=False)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == -signal.SIGKILL, out
    assert not (wd / "task_vector").exists()
    return sorted(x.name for x in (wd / "checkpoints").iterdir())


def _batches(log):
    """The batch hashes of each process that wrote ``log``, split at 'resume' lines."""
    runs = [[]]
    for line in Path(log).read_text().splitlines():
        if line == "resume":
            runs.append([])
        else:
            runs[-1].append(line)
    return runs


def test_sigkill_during_a_checkpoint_save_resumes_with_the_same_batches(tmp_path):
    steps = 24
    stream = ("--stream", "--ckpt-every", "2")
    _train(tmp_path / "ref", steps=steps, extra=(*stream, "--batch-log", str(tmp_path / "ref.log")))
    wd, log = tmp_path / "killed", tmp_path / "killed.log"
    logged = (*stream, "--batch-log", str(log))
    left = _killed(wd, ("--kill-during-save", "10"), steps, logged)
    # Killed as Orbax committed step 10: its finished temporary folder is left behind.
    assert "10" not in left and any(".orbax-checkpoint-tmp" in x for x in left), left
    assert "done" in _train(wd, steps=steps, extra=logged)
    assert not any(".orbax-checkpoint-tmp" in x.name for x in (wd / "checkpoints").iterdir())
    (ref,) = _batches(tmp_path / "ref.log")
    first, resumed = _batches(log)
    # The resumed process starts at the newest committed checkpoint (step 8) and hands out
    # exactly the batches the uninterrupted run used from there on.
    start = ref.index(resumed[0])
    assert start == 8, start
    assert first[:10] == ref[:10]
    assert resumed[: steps - start] == ref[start:steps]
    _close(_tau(tmp_path / "ref"), _tau(wd), 1e-6)


def test_sigkill_during_the_export_resumes_to_the_same_task_vector(tmp_path):
    extra = ("--ckpt-every", "4")
    _train(tmp_path / "ref", steps=12, extra=extra)
    wd = tmp_path / "killed"
    left = _killed(wd, ("--kill-during-export",), 12, extra)
    assert "12" in left  # every step was trained and saved before the export began
    assert list(wd.glob(".task_vector.tmp-*")), "the killed export left no temporary folder"
    assert "done" in _train(wd, steps=12, extra=extra)
    assert not list(wd.glob(".task_vector.tmp-*"))  # cleaned when the run was claimed again
    _close(_tau(tmp_path / "ref"), _tau(wd), 1e-6)
    rows = [json.loads(x)["step"] for x in (wd / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(1, 13))  # no row twice after the resume
