"""Flan-T5 on the 7 GLUE tasks as text-to-text (the paper's reference set-up).

Reference: Adam, lr 1e-5..4e-5, batch 16, 2000 steps, r 16, alpha 32, dropout 0.1, q and v.
Usage: --config=configs/t5.py:base|large[,tiny]  --config.task=cola
"""

from configs.common import base_config, parse_arg, pick_one, tiny

SIZES = ("base", "large")


def get_config(arg: str | None = None):
    args = parse_arg(arg, (*SIZES, "tiny"), "configs/t5.py")
    c = base_config()
    size = pick_one(args, SIZES, "base", "configs/t5.py")
    c.model = f"flan_t5_{size}"
    c.backbone = f"google/flan-t5-{size}"
    c.kind = "t5"
    c.task = "cola"
    c.optim.optimizer = "adam"
    c.optim.learning_rate = 4e-5
    c.optim.schedule = "constant"
    c.optim.clip_norm = 0.0
    c.steps = 2000
    c.batch_size = 16
    c.data.max_len = 128
    c.data.target_len = 8
    if size == "large":
        c.mesh.rules = "fsdp"
    if "tiny" in args:
        tiny(c)
    return c
