"""Fields shared by every fine-tuning config (ml_collections).

Every field can be overridden on the command line: ``--config.optim.learning_rate=3e-4``.
"""

from collections.abc import Iterable

from ml_collections import ConfigDict

from llora_jax.errors import ConfigError


def base_config() -> ConfigDict:
    c = ConfigDict()
    c.model = ""  # short name, used in run directories
    c.backbone = ""  # HF hub id or local directory
    c.kind = ""  # "text_encoder" | "t5" | "clip"
    c.task = ""
    c.method = "lora"  # full | lora | l_lora | l_lora_model
    c.seed = 0
    c.dtype = "auto"  # compute dtype: auto = bfloat16 on GPU/TPU, float32 on CPU
    c.param_dtype = "float32"  # storage dtype of the frozen backbone
    # auto | xla | cudnn | reference (backbones/attention.py); "cudnn" is the fused flash
    # kernel on NVIDIA GPUs (bf16; ViT-B/16 lora step 1.27x faster on an H100), not for
    # l_lora_model (no forward-mode derivative).
    c.attention_impl = "auto"

    c.lora = ConfigDict()
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.lora.dropout = 0.1
    c.lora.targets = ()  # () = the backbone's default (attention query and value)
    c.lora.init_b = "zero"
    c.lora.a0 = "shared"  # or "per_task": A0 from the seed folded with the task name

    c.optim = ConfigDict()
    c.optim.optimizer = "adamw"
    c.optim.learning_rate = 1e-4
    c.optim.weight_decay = 0.0
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 0
    c.optim.clip_norm = 1.0
    c.optim.grad_accum = 1

    c.steps = 1000
    c.batch_size = 16
    c.log_every = 20
    c.eval_every = 0  # 0: evaluate on the validation split only at the end
    c.ckpt_every = 200  # 0 = no checkpoints
    c.tensorboard = True  # TensorBoard event files beside metrics.jsonl
    c.rng_impl = "rbg"  # dropout PRNG: rbg (fast to compile) or threefry2x32
    c.eval_batch_size = 64

    c.data = ConfigDict()
    c.data.data_dir = ""  # "" = $LLORA_DATA_DIR, else tfds
    # auto | local | tfds | hf | hf:<hub id or dir>[#<config>] | folder:<root>
    c.data.source = "auto"
    c.data.skip_corrupt = False  # streamed images: skip (and count) undecodable files
    c.data.workers = 0  # streamed images: decode/resize worker processes (0 = in-process)
    c.data.val_size = 0  # 0 = min(10% of train, val_max)
    c.data.val_max = 1000
    c.data.max_len = 128
    c.data.target_len = 8
    c.data.train_limit = 0  # 0 = all
    c.data.eval_limit = 0  # cap on validation / test examples (0 = all)
    c.data.image_size = 224

    c.mesh = ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.model = 1
    c.mesh.rules = "replicated"  # replicated | fsdp | tp
    return c


def tiny(c: ConfigDict) -> ConfigDict:
    """Seconds-long runs for tests: few steps, short inputs, few examples."""
    c.steps = 6
    c.optim.warmup_steps = 1
    c.batch_size = 4
    c.log_every = 2
    c.ckpt_every = 3
    c.eval_batch_size = 8
    c.lora.rank = 2
    c.lora.alpha = 4.0
    c.data.max_len = 16
    c.data.train_limit = 32
    c.data.eval_limit = 16
    c.data.val_size = 16
    c.data.image_size = 32
    c.dtype = "float32"
    return c


def parse_arg(arg: str | None, valid: Iterable[str], where: str) -> set[str]:
    """The comma-separated words of a config-file argument (``file.py:a,b``).

    A word the file does not know is an error listing the valid ones: a typo must not
    silently give the default (full-size) config.
    """
    valid = tuple(valid)
    args = {a.strip() for a in (arg or "").split(",") if a.strip()}
    unknown = sorted(args - set(valid))
    if unknown:
        raise ConfigError(
            f"{where}: unknown config argument(s) {', '.join(map(repr, unknown))}; valid: "
            f"{', '.join(valid)} (comma-separated, e.g. {where}:{valid[-1]})"
        )
    return args


def pick_one(args: set[str], choices: Iterable[str], default: str, where: str) -> str:
    """The one word of ``args`` among ``choices`` (``default`` if none); two is an error."""
    picked = sorted(args & set(choices))
    if len(picked) > 1:
        raise ConfigError(f"{where}: choose one of {', '.join(picked)}, not several")
    return picked[0] if picked else default
