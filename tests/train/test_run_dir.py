"""Run records refuse a resume with other settings; the workdir lock; checkpoint hygiene."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from llora_jax.train import run_dir

CONFIG = {
    "seed": 0,
    "steps": 100,
    "log_every": 10,
    "optim": {"learning_rate": 1e-4, "schedule": "cosine"},
    "lora": {"rank": 16, "targets": ["query", "value"]},
    "mesh": {"data": -1, "fsdp": 1},
}


def _fields(**changes):
    config = json.loads(json.dumps(CONFIG))
    for dotted, value in changes.items():
        node = config
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return run_dir.run_fields(config, backbone_fingerprint="bb0", data_fingerprint="data0")


def test_fields_are_flat_and_carry_provenance():
    f = _fields()
    assert f["optim.learning_rate"] == 1e-4 and f["lora.targets"] == ["query", "value"]
    assert f["backbone_fingerprint"] == "bb0" and f["data_fingerprint"] == "data0"
    assert "package_version" in f


def test_locations_give_way_to_content_fingerprints():
    config = dict(CONFIG, backbone="/home/me/minilm", data={"data_dir": "/data", "max_len": 64})
    f = run_dir.run_fields(config, backbone_fingerprint="bb", data_fingerprint="d")
    assert "backbone" not in f and "data.data_dir" not in f and f["data.max_len"] == 64
    moved = dict(config, backbone="/scratch/minilm", data={"data_dir": "/mnt", "max_len": 64})
    g = run_dir.run_fields(moved, backbone_fingerprint="bb", data_fingerprint="d")
    assert run_dir.run_fingerprint(f) == run_dir.run_fingerprint(g)
    # Without fingerprints the locations are all there is to compare.
    h = run_dir.run_fields(config, backbone_fingerprint=None, data_fingerprint=None)
    assert h["backbone"] == "/home/me/minilm" and h["data.data_dir"] == "/data"


def test_fingerprint_ignores_order_and_safe_fields_but_not_others():
    a = _fields()
    assert run_dir.run_fingerprint(a) == run_dir.run_fingerprint(dict(reversed(list(a.items()))))
    assert run_dir.run_fingerprint(a) == run_dir.run_fingerprint(_fields(steps=500))
    assert run_dir.run_fingerprint(a) != run_dir.run_fingerprint(_fields(seed=1))
    # A tuple and a list are the same value once written to JSON.
    t = dict(a, **{"lora.targets": ("query", "value")})
    assert run_dir.run_fingerprint(a) == run_dir.run_fingerprint(t)


def test_fresh_and_identical_runs_resume(tmp_path):
    wd = tmp_path / "run"
    assert run_dir.check_resume(wd, _fields()) == []
    run_dir.write_run_record(wd, _fields())
    assert run_dir.check_resume(wd, _fields()) == []
    record = run_dir.read_run_record(wd)
    assert record["fingerprint"] == run_dir.run_fingerprint(_fields())


@pytest.mark.parametrize(
    "change, shown",
    [
        ({"seed": 1}, "seed: 0 -> 1"),
        ({"optim__learning_rate": 1e-5}, "optim.learning_rate: 0.0001 -> 1e-05"),
        ({"optim__schedule": "constant"}, 'optim.schedule: "cosine" -> "constant"'),
        ({"lora__rank": 8}, "lora.rank: 16 -> 8"),
    ],
)
def test_result_changing_fields_are_refused_naming_old_and_new(tmp_path, change, shown):
    wd = tmp_path / "run"
    run_dir.write_run_record(wd, _fields())
    with pytest.raises(run_dir.RunMismatch) as exc:
        run_dir.check_resume(wd, _fields(**change))
    msg = str(exc.value)
    assert shown in msg and "--restart" in msg and "\n" not in msg


def test_other_data_or_backbone_is_refused(tmp_path):
    wd = tmp_path / "run"
    run_dir.write_run_record(wd, _fields())
    new = dict(_fields(), data_fingerprint="data1", backbone_fingerprint="bb1")
    with pytest.raises(run_dir.RunMismatch, match='data_fingerprint: "data0" -> "data1"') as exc:
        run_dir.check_resume(wd, new)
    assert 'backbone_fingerprint: "bb0" -> "bb1"' in str(exc.value)
    # A field that appears or disappears is a difference too.
    with pytest.raises(run_dir.RunMismatch, match=r"lora.dropout: \(absent\) -> 0.1"):
        run_dir.check_resume(wd, dict(_fields(), **{"lora.dropout": 0.1}))


def test_safe_fields_may_change_and_are_reported(tmp_path):
    wd = tmp_path / "run"
    run_dir.write_run_record(wd, _fields())
    changed = run_dir.check_resume(wd, _fields(steps=200, log_every=5, mesh__data=4))
    assert changed == ["log_every", "mesh.data", "steps"]
    # The caller decides what is safe: with nothing declared safe, steps is refused.
    with pytest.raises(run_dir.RunMismatch, match="steps: 100 -> 200"):
        run_dir.check_resume(wd, _fields(steps=200), safe_fields=())


def test_a_run_without_record_cannot_be_resumed(tmp_path):
    wd = tmp_path / "run"
    (wd / "checkpoints").mkdir(parents=True)
    with pytest.raises(run_dir.RunMismatch, match="no run.json.*--restart"):
        run_dir.check_resume(wd, _fields())


def test_damaged_record_is_refused(tmp_path):
    wd = tmp_path / "run"
    wd.mkdir()
    (wd / "run.json").write_text("{not json")
    with pytest.raises(run_dir.RunMismatch, match="not valid JSON"):
        run_dir.check_resume(wd, _fields())


def test_restart_moves_the_old_run_aside(tmp_path):
    wd = tmp_path / "run"
    run_dir.write_run_record(wd, _fields())
    (wd / "checkpoints").mkdir()
    old = run_dir.restart(wd)
    assert not wd.exists() and old.name.startswith("run.old-")
    assert (old / "run.json").is_file() and (old / "checkpoints").is_dir()
    assert run_dir.check_resume(wd, _fields(seed=1)) == []
    # Two restarts within one second do not collide.
    run_dir.write_run_record(wd, _fields())
    second = run_dir.restart(wd)
    assert second != old and second.exists() and old.exists()
    assert run_dir.restart(tmp_path / "absent") is None


# ----------------------------------------------------------------------------- lock


def test_second_holder_is_refused_then_free_after_release(tmp_path):
    wd = tmp_path / "run"
    with run_dir.workdir_lock(wd) as lock:
        info = json.loads(lock.read_text())
        assert info["pid"] == os.getpid() and info["host"]
        with pytest.raises(run_dir.WorkdirLocked, match=f"pid {os.getpid()}.*another --workdir"):
            with run_dir.workdir_lock(wd):
                pass
    assert not run_dir.lock_path(wd).exists()
    with run_dir.workdir_lock(wd):
        pass


def test_restart_while_holding_the_lock(tmp_path):
    wd = tmp_path / "run"
    run_dir.write_run_record(wd, _fields())
    with run_dir.workdir_lock(wd):
        run_dir.restart(wd)
        run_dir.write_run_record(wd, _fields(seed=3))
    assert run_dir.read_run_record(wd)["fields"]["seed"] == 3


HOLDER = textwrap.dedent(
    """
    import sys, time
    from llora_jax.train import run_dir
    with run_dir.workdir_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(600)
    """
)


def test_lock_of_a_sigkilled_holder_is_taken_over(tmp_path):
    wd = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(wd)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(run_dir.WorkdirLocked, match=f"pid {proc.pid}"):
            with run_dir.workdir_lock(wd):
                pass
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert run_dir.lock_path(wd).exists()  # the killed holder left its file behind
        with run_dir.workdir_lock(wd) as lock:
            assert json.loads(lock.read_text())["pid"] == os.getpid()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ----------------------------------------------------------------------------- checkpoints


def _save_steps(ckpt_dir, steps):
    mngr = ocp.CheckpointManager(
        ckpt_dir.absolute(), options=ocp.CheckpointManagerOptions(max_to_keep=10, create=True)
    )
    for s in steps:
        mngr.save(s, args=ocp.args.StandardSave({"w": jnp.full((3,), float(s))}))
    mngr.wait_until_finished()
    return mngr


def _restorer(mngr):
    abstract = {"w": jnp.zeros((3,))}
    return lambda s: mngr.restore(s, args=ocp.args.StandardRestore(abstract))


def test_steps_are_listed_and_stale_tmp_dirs_removed(tmp_path):
    ckpt = tmp_path / "checkpoints"
    _save_steps(ckpt, [1, 2]).close()
    (ckpt / "3.orbax-checkpoint-tmp-1733390000").mkdir()  # a save killed mid-way
    (ckpt / "3.orbax-checkpoint-tmp-1733390000" / "partial").write_text("x")
    assert run_dir.checkpoint_steps(ckpt) == [1, 2]
    removed = run_dir.remove_stale_tmp(ckpt)
    assert [p.name for p in removed] == ["3.orbax-checkpoint-tmp-1733390000"]
    assert sorted(p.name for p in ckpt.iterdir()) == ["1", "2"]
    assert run_dir.remove_stale_tmp(tmp_path / "absent") == []


def test_valid_checkpoint_passes(tmp_path):
    ckpt = tmp_path / "checkpoints"
    mngr = _save_steps(ckpt, [1])
    assert run_dir.validate_checkpoint(ckpt / "1", _restorer(mngr)) is None
    mngr.close()


def test_uncommitted_newest_step_falls_back_with_a_warning(tmp_path):
    ckpt = tmp_path / "checkpoints"
    _save_steps(ckpt, [1, 2, 3]).close()
    for marker in ("commit_success.txt", "_CHECKPOINT_METADATA"):
        (ckpt / "3" / marker).unlink()
    warnings = []
    assert run_dir.newest_valid_step(ckpt, warn=warnings.append) == 2
    assert len(warnings) == 1 and "step 3" in warnings[0] and "commit marker" in warnings[0]
    assert run_dir.checkpoint_steps(ckpt) == [1, 2]
    assert [p.name.split("-")[0] for p in (tmp_path / "checkpoints.damaged").iterdir()] == ["3"]


def test_unreadable_data_falls_back_to_the_newest_step_that_restores(tmp_path):
    ckpt = tmp_path / "checkpoints"
    _save_steps(ckpt, [1, 2, 3]).close()
    # Markers intact but the array data gone (a disk that lost files): only a restore tells.
    for step in ("2", "3"):
        for f in (ckpt / step).rglob("*"):
            if f.is_file() and f.parent.name == "d":
                f.write_bytes(b"")
    mngr = ocp.CheckpointManager(ckpt.absolute())
    warnings = []
    step = run_dir.newest_valid_step(ckpt, _restorer(mngr), warn=warnings.append)
    mngr.close()
    assert step == 1 and len(warnings) == 2 and "restore failed" in warnings[0]
    mngr = ocp.CheckpointManager(ckpt.absolute())
    np.testing.assert_array_equal(np.asarray(_restorer(mngr)(1)["w"]), [1.0, 1.0, 1.0])
    mngr.close()


def test_no_valid_step_means_start_over(tmp_path):
    ckpt = tmp_path / "checkpoints"
    _save_steps(ckpt, [1]).close()
    (ckpt / "1" / "default" / "_METADATA").unlink()
    assert run_dir.newest_valid_step(ckpt, warn=lambda m: None) is None
    assert run_dir.newest_valid_step(tmp_path / "absent") is None


def test_prepare_workdir_checks_records_and_cleans(tmp_path):
    wd = tmp_path / "run"
    assert run_dir.prepare_workdir(wd, _fields()) == []
    (wd / "checkpoints" / "7.orbax-checkpoint-tmp-99").mkdir(parents=True)
    assert run_dir.prepare_workdir(wd, _fields(steps=300)) == ["steps"]
    assert list((wd / "checkpoints").iterdir()) == []
    assert run_dir.read_run_record(wd)["fields"]["steps"] == 300
    with pytest.raises(run_dir.RunMismatch, match="seed: 0 -> 2"):
        run_dir.prepare_workdir(wd, _fields(seed=2))
    assert run_dir.prepare_workdir(wd, _fields(seed=2), start_over=True) == []
    assert run_dir.read_run_record(wd)["fields"]["seed"] == 2
