"""The paper's vision study: CLIP ViT-B/16, the 8 vision tasks, zero-shot heads.

For machines with internet (hub weights, tfds datasets prepared as ArrayRecord) and
accelerators. Reference hyper-parameters live in configs/clip.py (AdamW lr 1e-5, wd 0.1,
batch 64, 6000 steps, 600 warm-up, r 16, alpha 32, dropout 0.1, q and v).
SUN397, Cars and DTD (images of varying sizes) stream through the grain pipeline
(``--set config.data.workers=8``, ``--set config.data.skip_corrupt=True``;
docs/notes/data.md) and train one run at a time; the fixed-size tasks train in groups.
get_study("tiny") is the seconds-long smoke test used by the tests (tiny backbone and
data passed by override).
"""

from llora_jax.study.spec import base_study, tiny_study

TASKS = ["sun397", "cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]


def get_study(arg=None):
    s = base_study("clip_vit_b16", "configs/clip.py", "b16")
    s.overrides = (("data.eval_limit", 2000), ("data.val_max", 1000))
    s.tasks = TASKS
    s.learning_rates = [1e-5]
    s.pairs = [("eurosat", "svhn"), ("gtsrb", "mnist"), ("resisc45", "dtd"), ("cars", "sun397")]
    s.eval_batch_size = 256
    if arg == "tiny":
        return tiny_study(s, ["gtsrb", "svhn"], "lora", "task_arithmetic", [{"lam": 1.0}])
    if arg:
        raise ValueError(f"unknown study argument {arg!r}; use '' or 'tiny'")
    return s
