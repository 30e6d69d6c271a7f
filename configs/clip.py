"""CLIP vision towers on the 8 vision tasks with frozen zero-shot heads (the paper's set-up).

Reference: AdamW lr 1e-5, wd 0.1, batch 64, 6000 steps, 600 warm-up, r 16, alpha 32,
dropout 0.1, q and v. Usage: --config=configs/clip.py:b16|b32|l14[,tiny] --config.task=eurosat
"""

from configs.common import base_config, parse_arg, pick_one, tiny

HUB = {
    "b16": "openai/clip-vit-base-patch16",
    "b32": "openai/clip-vit-base-patch32",
    "l14": "openai/clip-vit-large-patch14",
}


def get_config(arg: str | None = None):
    args = parse_arg(arg, (*HUB, "tiny"), "configs/clip.py")
    size = pick_one(args, HUB, "b16", "configs/clip.py")
    c = base_config()
    c.model = f"clip_vit_{size}"
    c.backbone = HUB[size]
    c.kind = "clip"
    c.task = "eurosat"
    c.templates = "paper"  # "paper" = "a photo of a {c}." | "ensemble" = per-dataset templates
    c.image_mode = "clip"  # "clip" = CLIPImageProcessor | "resize" = the paper's 224x224, no norm
    c.optim.optimizer = "adamw"
    c.optim.learning_rate = 1e-5
    c.optim.weight_decay = 0.1
    c.optim.warmup_steps = 600
    c.steps = 6000
    c.batch_size = 64
    if "tiny" in args:
        tiny(c)
    return c
