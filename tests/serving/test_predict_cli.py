"""``llora predict`` end to end on a tiny BERT bank of two tasks, and one routed pass over a
study's members, against the per-task evaluation (``evaluation.grid.predict``)."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from configs import minilm
from llora_jax import experiment, forward, task_vectors
from llora_jax import tree as tree_lib
from llora_jax.cli import predict as cli_predict
from llora_jax.data import get_task
from llora_jax.evaluation import grid as grid_eval
from llora_jax.fusion.programs import Member
from llora_jax.interop import api as interop
from llora_jax.interop import delta_w as dw
from llora_jax.serving import members as members_lib
from llora_jax.serving import predict as predict_lib
from llora_jax.serving import row_tasks
from llora_jax.tasks import Experiment, text_encoder
from tests.fixtures import interop_models as im
from tests.fixtures import tiny_models

SST2 = ["a fine film", "dull and slow", "the best of the year", "not good at all", "fine"]
RTE = [("the cat sat", "a cat sat"), ("dogs ran far", "nothing ran"), ("a mat", "the mat")]
WORDS = tiny_models.words_of(SST2 + [w for p in RTE for w in p])


def _config(path, task):
    c = minilm.get_config()
    c.backbone, c.task, c.data.max_len = str(path), task, 16
    c.lora.rank, c.lora.alpha = 2, 4.0
    return c


def _save(root, name, c, seed):
    """A task vector as finetune writes it (meta["config"] included), random nonzero B."""
    exp_tm = row_tasks.row_task_from_config(c, experiment.BackboneCache()).task_model
    spec = experiment.AdapterSpec(c.method, experiment.lora_config(c, ("query", "value")))
    phi, phi0 = forward.init_trainable(exp_tm, spec, jax.random.key(seed))
    tau = jax.tree.map(lambda x: 0.5 * jnp.cos(seed + jnp.arange(x.size)).reshape(x.shape), phi)
    meta = task_vectors.make_meta(
        base_model=c.backbone,
        base_fingerprint="tiny",
        adapter_kind="lora",
        mode=c.method,
        task=c.task,
        seed=seed,
        steps=1,
        targets=list(spec.lora.targets),
        rank=c.lora.rank,
        alpha=c.lora.alpha,
        phi0_fingerprint=tree_lib.fingerprint(phi0),
        config=json.loads(c.to_json_best_effort()),
    )
    task_vectors.save(root / name, tau, meta, phi0=phi0)
    return spec, tree_lib.add(phi0, tau), phi0


@pytest.fixture(scope="module")
def bank_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    path = tiny_models.tiny_bert(root / "bert", WORDS, dropout=0.0)
    saved = {
        "user_a": _save(root / "bank", "user_a", _config(path, "sst2"), 1),
        "user_b": _save(root / "bank", "user_b", _config(path, "sst2"), 2),
        "rte_1": _save(root / "bank", "rte_1", _config(path, "rte"), 3),
    }
    return root, path, saved


def _rows():
    rows = [
        {"id": i, "adapter": n, "sentence": s}
        for i, (n, s) in enumerate(zip(["user_a", "user_b", "user_a", None, "user_b"], SST2))
    ]
    rows[3]["task"] = "sst2"  # a base-model row of a two-task bank names its task
    rows += [
        {"id": 10 + i, "adapter": "rte_1", "sentence1": a, "sentence2": b}
        for i, (a, b) in enumerate(RTE)
    ]
    return rows


def _logits_task(t):
    # A continuous function of both logits instead of their argmax (a stronger check).
    tm = dataclasses.replace(t.task_model, predict=_two_logits)
    return dataclasses.replace(t, task_model=tm, decode=float)


def _two_logits(out, batch):
    return out["logits"][..., 0] - 0.5 * out["logits"][..., 1]  # packed batches too


def _reference(c_path, saved, row, argmax=False):
    """The per-task evaluation of one row: its task's model with the adapter's φ (or none)."""
    task = row.get("task") or ("rte" if row["adapter"] == "rte_1" else "sst2")
    tm = row_tasks.row_task_from_config(_config(c_path, task), experiment.BackboneCache())
    tm = tm.task_model if argmax else _logits_task(tm).task_model
    spec = get_task(task)
    ex = {f: [row[f]] for f in spec.text_fields} | {"label": [0]}
    arrays = text_encoder.encode_examples(tm_tok(c_path), spec, ex, 16)
    if row["adapter"] is None:
        out = tm.readout(_base_call(tm), arrays, tm.head, False)
        return float(tm.predict(out, arrays)[0])
    ad, phi, phi0 = saved[row["adapter"]]
    return grid_eval.predict(tm, ad, phi, phi0, arrays, batch_size=1)[0]


def tm_tok(path):
    return experiment.BackboneCache().get(str(path), jnp.float32, jnp.float32)[1]


def _base_call(tm):
    return lambda *a, **kw: tm.module.apply({"params": tm.params}, *a, **kw)


def test_routed_logits_of_a_two_task_bank_equal_per_task_evaluation(bank_dir):
    root, path, saved = bank_dir
    bank = cli_predict.AdapterBank.from_directory(root / "bank", capacity=2)
    tasks = row_tasks.tasks_from_configs(bank.metas)
    assert sorted(tasks) == ["rte", "sst2"]
    # Heads padded to one class count (sst2 2, rte 2 here): one compiled program.
    rows = _rows()
    got = predict_lib.predict_rows(
        bank, {t: _logits_task(v) for t, v in tasks.items()}, rows, batch_size=4, progress=False
    )
    for row, g in zip(rows, got):
        want = _reference(path, saved, row)
        np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-5)


def test_predict_command_writes_label_names_in_order(bank_dir, tmp_path):
    root, path, saved = bank_dir
    rows = _rows()
    src, out = tmp_path / "rows.jsonl", tmp_path / "preds.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    summary = cli_predict.predict_command(
        root / "bank", src, out, capacity=1, batch_size=2, progress=False
    )
    got = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert summary["rows"] == len(rows) and [g["id"] for g in got] == [r["id"] for r in rows]
    for row, g in zip(rows, got):
        spec = get_task("rte" if row["adapter"] == "rte_1" else "sst2")
        want = spec.label_names[int(_reference(path, saved, row, argmax=True))]
        assert g["prediction"] == want and g["adapter"] == row["adapter"]


def test_predict_command_refuses_bad_rows_before_work(bank_dir, tmp_path):
    root, _, _ = bank_dir
    src, out = tmp_path / "rows.jsonl", tmp_path / "preds.jsonl"
    good = json.dumps({"adapter": "user_a", "sentence": "fine"})
    unknown = json.dumps({"adapter": "nobody", "sentence": "fine"})
    no_task = json.dumps({"adapter": None, "sentence": "no task"})
    no_field = json.dumps({"adapter": "rte_1", "sentence1": "only one"})
    # Adapters are checked before any model loads; fields once the tasks are known.
    src.write_text("\n".join([good, unknown, no_task]) + "\n")
    with pytest.raises(predict_lib.PredictInputError, match="row 2: adapter 'nobody' is not in"):
        cli_predict.predict_command(root / "bank", src, out, progress=False)
    src.write_text("\n".join([good, no_task, no_field]) + "\n")
    with pytest.raises(predict_lib.PredictInputError) as e:
        cli_predict.predict_command(root / "bank", src, out, progress=False)
    msg = str(e.value)
    assert "row 2 (adapter None): task None is not one of ['rte', 'sst2']" in msg
    assert "row 3 (adapter 'rte_1'): missing field(s) ['sentence2']" in msg
    assert not out.exists() and not list(tmp_path.glob(".preds*"))


def test_llora_predict_is_a_command_with_one_line_errors(bank_dir, tmp_path):
    root, _, _ = bank_dir
    src = tmp_path / "rows.jsonl"
    src.write_text(json.dumps({"adapter": "nobody", "sentence": "x"}) + "\n")
    cmd = [sys.executable, "-m", "llora_jax.cli", "predict", f"--bank={root / 'bank'}"]
    cmd += [f"--input={src}", f"--out={tmp_path / 'p.jsonl'}", "--batch-size=4"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 1 bad input row(s)") and "adapter 'nobody'" in last
    assert "Traceback" not in r.stderr and not (tmp_path / "p.jsonl").exists()


def test_predict_members_equals_per_task_evaluation(bank_dir):
    root, path, saved = bank_dir
    members = []
    for name, task, texts in (("user_a", "sst2", SST2), ("rte_1", "rte", RTE)):
        rt = _logits_task(
            row_tasks.row_task_from_config(_config(path, task), experiment.BackboneCache())
        )
        spec = get_task(task)
        cols = [list(x) for x in zip(*texts)] if task == "rte" else [texts]
        ex = dict(zip(spec.text_fields, cols)) | {"label": [0] * len(texts)}
        arrays = text_encoder.encode_examples(tm_tok(path), spec, ex, 16)
        exp = Experiment(task, rt.task_model, saved[name][0], {"test": arrays}, None, spec)
        members.append(Member(exp=exp, tv=task_vectors.load(root / "bank" / name)))
    got = members_lib.predict_members(members, "test", batch_size=4)
    for m in members:
        ad, phi, phi0 = saved["user_a" if m.task == "sst2" else "rte_1"]
        want = grid_eval.predict(m.exp.tm, ad, phi, phi0, m.exp.arrays["test"], batch_size=2)
        np.testing.assert_allclose(got[m.task], want, rtol=1e-5, atol=1e-5)


def test_predict_command_with_a_config_serves_imported_peft_adapters(bank_dir, tmp_path):
    """Imported adapters carry no fine-tuning config: --config names the task model."""
    _, path, _ = bank_dir
    im.peft_adapter(
        transformers.BertModel.from_pretrained(path),
        tmp_path / "peft_a",
        seed=3,
        r=2,
        lora_alpha=4,
        target_modules=["query", "value"],
    )
    interop.import_peft([tmp_path / "peft_a"], path, tmp_path / "bank")
    rows = [{"id": i, "adapter": "peft_a", "sentence": s} for i, s in enumerate(SST2)]
    src, out = tmp_path / "rows.jsonl", tmp_path / "preds.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ValueError, match="carry no fine-tuning config.*--config"):
        cli_predict.predict_command(tmp_path / "bank", src, out, progress=False)
    c = _config(path, "sst2")
    cli_predict.predict_command(tmp_path / "bank", src, out, config=c, progress=False)
    got = [json.loads(ln)["prediction"] for ln in out.read_text().splitlines()]
    # Reference: the base model with W0 + ΔW folded in, evaluated per row.
    rt = row_tasks.row_task_from_config(c, experiment.BackboneCache())
    tau = task_vectors.load(tmp_path / "bank" / "peft_a").tau
    tm = dataclasses.replace(rt.task_model, params=dw.merged_params(rt.task_model.params, tau))
    arrays = rt.encode(rows)
    logits = tm.readout(_base_call(tm), arrays, tm.head, False)["logits"]
    assert got == [get_task("sst2").label_names[int(i)] for i in np.argmax(logits, -1)]
