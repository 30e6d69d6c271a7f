"""validate_run_config: every rule refuses its bad value; config-file arguments are checked."""

import copy
import math

import pytest

from configs import clip, common, minilm, t5
from llora_jax import config_checks
from llora_jax.errors import ConfigError, UserError


def _valid():
    return minilm.get_config("tiny").to_dict()


def _with(dotted, value):
    c = copy.deepcopy(_valid())
    node = c
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    return c


@pytest.mark.parametrize(
    "get, arg",
    [
        (minilm.get_config, None),
        (minilm.get_config, "tiny"),
        (t5.get_config, "base"),
        (t5.get_config, "large,tiny"),
        (clip.get_config, "b32"),
        (clip.get_config, "l14,tiny"),
    ],
)
def test_shipped_configs_are_valid(get, arg):
    assert config_checks.config_problems(get(arg)) == []
    config_checks.validate_run_config(get(arg))


BAD = [
    ("steps", 0, "steps must be >= 1, got 0"),
    ("steps", -5, "steps must be >= 1"),
    ("steps", 2.5, "steps must be an integer"),
    ("steps", True, "steps must be an integer"),
    ("batch_size", 0, "batch_size must be >= 1"),
    ("eval_batch_size", 0, "eval_batch_size must be >= 1"),
    ("log_every", 0, "log_every must be >= 1"),
    ("eval_every", -1, "eval_every must be >= 0"),
    ("ckpt_every", -1, "ckpt_every must be >= 0"),
    ("seed", -1, "seed must be >= 0"),
    ("lora.rank", 0, "lora.rank must be >= 1"),
    ("lora.alpha", 0.0, "lora.alpha must be > 0"),
    ("lora.dropout", 1.0, "lora.dropout must be < 1"),
    ("lora.dropout", -0.1, "lora.dropout must be >= 0"),
    ("lora.targets", "query", "lora.targets must be a list"),
    ("lora.init_b", "gaussian", "lora.init_b unknown value 'gaussian'; valid: zero, normal"),
    ("optim.learning_rate", -1e-4, "optim.learning_rate must be > 0, got -0.0001"),
    ("optim.learning_rate", 0.0, "optim.learning_rate must be > 0"),
    ("optim.learning_rate", math.nan, "optim.learning_rate must be finite"),
    ("optim.learning_rate", math.inf, "optim.learning_rate must be finite"),
    ("optim.learning_rate", "1e-4", "optim.learning_rate must be a number"),
    ("optim.weight_decay", -0.1, "optim.weight_decay must be >= 0"),
    ("optim.clip_norm", -1.0, "optim.clip_norm must be >= 0"),
    ("optim.grad_accum", 0, "optim.grad_accum must be >= 1"),
    ("optim.warmup_steps", -1, "optim.warmup_steps must be >= 0"),
    (
        "optim.optimizer",
        "adam_w",
        "optim.optimizer unknown value 'adam_w'; valid: adamw, adam, sgd",
    ),
    ("optim.schedule", "linear", "optim.schedule unknown value 'linear'; valid: cosine, constant"),
    ("method", "llora", "method unknown value 'llora'; valid: full, lora, l_lora, l_lora_model"),
    ("kind", "bert", "kind unknown value 'bert'; valid: text_encoder, t5, clip"),
    ("dtype", "bf16", "dtype unknown value 'bf16'"),
    ("param_dtype", "float8", "param_dtype unknown value 'float8'"),
    ("attention_impl", "flash", "attention_impl unknown value 'flash'"),
    ("rng_impl", "threefry", "rng_impl unknown value 'threefry'"),
    ("tensorboard", "yes", "tensorboard must be true or false"),
    ("data.source", "hugginface", "data.source unknown value 'hugginface'"),
    ("data.max_len", 0, "data.max_len must be >= 1"),
    ("data.val_size", -1, "data.val_size must be >= 0"),
    ("data.train_limit", -1, "data.train_limit must be >= 0"),
    ("data.image_size", 0, "data.image_size must be >= 1"),
    ("mesh.data", 0, "mesh.data must be >= 1 (or -1 for all the rest)"),
    ("mesh.rules", "zero3", "mesh.rules unknown value 'zero3'"),
    ("head_scale", -20.0, "head_scale must be > 0"),
    ("task", "", "task must be a non-empty string"),
    ("backbone", "  ", "backbone must be a non-empty string"),
]


@pytest.mark.parametrize("field, value, message", BAD, ids=[f"{b[0]}={b[1]!r}" for b in BAD])
def test_each_rule_refuses_its_bad_value(field, value, message):
    problems = config_checks.config_problems(_with(field, value))
    assert any(message in p for p in problems), problems
    assert len(problems) == 1, problems  # nothing else is blamed
    with pytest.raises(ConfigError) as exc:
        config_checks.validate_run_config(_with(field, value))
    assert isinstance(exc.value, UserError) and "\n" not in str(exc.value)
    assert "--config." in str(exc.value)


def test_every_problem_is_listed_at_once():
    c = _with("steps", 0)
    c["lora"]["rank"] = 0
    c["optim"]["learning_rate"] = -1.0
    with pytest.raises(ConfigError, match=r"^3 problem\(s\)") as exc:
        config_checks.validate_run_config(c)
    assert all(f in str(exc.value) for f in ("steps", "lora.rank", "optim.learning_rate"))


def test_cross_field_rules():
    c = _with("optim.warmup_steps", 6)  # tiny: steps = 6
    assert any(
        "warmup_steps=6 must be smaller than steps=6" in p for p in config_checks.config_problems(c)
    )
    c = _with("method", "l_lora_model")
    c["attention_impl"] = "cudnn"
    assert any("no forward-mode derivative" in p for p in config_checks.config_problems(c))


def test_missing_required_field():
    c = _valid()
    del c["method"]
    assert config_checks.config_problems(c) == ["method is missing"]


def test_clip_extras_are_checked():
    c = clip.get_config("tiny").to_dict()
    c["templates"], c["image_mode"] = "photo", "crop"
    problems = config_checks.config_problems(c)
    assert any("templates unknown value 'photo'" in p for p in problems)
    assert any("image_mode unknown value 'crop'" in p for p in problems)


def test_fusion_names():
    known = ("task_arithmetic", "ties", "average")
    config_checks.validate_fusion_names(["ties", "average"], known)
    with pytest.raises(ConfigError, match=r"unknown fusion method\(s\) \['tie'\]; valid: average"):
        config_checks.validate_fusion_names(["tie"], known)
    with pytest.raises(ConfigError, match="more than once"):
        config_checks.validate_fusion_names(["ties", "ties"], known)


# ----------------------------------------------------------------------------- config files


@pytest.mark.parametrize(
    "get, arg, valid",
    [
        (minilm.get_config, "tny", "valid: tiny"),
        (minilm.get_config, "tiny,large", "valid: tiny"),
        (t5.get_config, "xl", "valid: base, large, tiny"),
        (clip.get_config, "b16,tinyy", "valid: b16, b32, l14, tiny"),
    ],
)
def test_unknown_config_file_argument_is_refused_listing_valid_ones(get, arg, valid):
    with pytest.raises(ConfigError, match=valid) as exc:
        get(arg)
    assert "unknown config argument" in str(exc.value)


def test_two_sizes_are_refused():
    with pytest.raises(ConfigError, match="choose one of b16, l14"):
        clip.get_config("b16,l14")
    with pytest.raises(ConfigError, match="choose one of base, large"):
        t5.get_config("base,large")


def test_known_arguments_still_work():
    assert minilm.get_config("tiny").steps == 6 and minilm.get_config(None).steps == 1000
    assert minilm.get_config(" tiny ").steps == 6
    assert t5.get_config("large").model == "flan_t5_large"
    assert clip.get_config("l14,tiny").model == "clip_vit_l14"
    assert common.parse_arg("", ("tiny",), "x.py") == set()


@pytest.mark.parametrize(
    "source, ok",
    [
        ("auto", True),
        ("hf", True),
        ("hf:tanganke/dtd", True),
        ("hf:/data/hf/sun397#default", True),
        ("folder:/data/pets", True),
        ("hf:", False),
        ("folder: ", False),
        ("huggingface", False),
    ],
)
def test_every_data_source_the_loader_reads_is_accepted(source, ok):
    problems = config_checks.config_problems(_with("data.source", source))
    assert (problems == []) == ok, problems
    if not ok:
        assert "hf:<hub id or directory>" in problems[0]


def test_streaming_fields_are_checked():
    assert config_checks.config_problems(_with("data.workers", -1)) == [
        "data.workers must be >= 0, got -1"
    ]
    assert (
        "must be true or false"
        in config_checks.config_problems(_with("data.skip_corrupt", "yes"))[0]
    )


def test_names_agree_with_the_modules_that_use_them():
    from llora_jax import tasks  # heavy: only this test needs the task builders
    from llora_jax.train import optim

    assert config_checks.KINDS == tasks.KINDS
    assert config_checks.OPTIMIZERS == optim.OPTIMIZERS
    assert config_checks.SCHEDULES == optim.SCHEDULES
