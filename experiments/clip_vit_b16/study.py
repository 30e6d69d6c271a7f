"""The paper's vision study: CLIP ViT-B/16, the 8 vision tasks, zero-shot heads.

For machines with internet (hub weights, tfds datasets prepared as ArrayRecord) and
accelerators. Reference hyper-parameters live in configs/clip.py (AdamW lr 1e-5, wd 0.1,
batch 64, 6000 steps, 600 warm-up, r 16, alpha 32, dropout 0.1, q and v).
get_study("tiny") is the seconds-long smoke test used by the tests (tiny backbone and
data passed by override).
"""

from ml_collections import ConfigDict

TASKS = ["sun397", "cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]


def get_study(arg=None):
    s = ConfigDict()
    s.name = "clip_vit_b16"
    s.config = "configs/clip.py"
    s.config_arg = "b16"
    s.overrides = (("data.eval_limit", 2000), ("data.val_max", 1000))
    s.tasks = TASKS
    s.methods = ["full", "lora", "l_lora", "l_lora_model"]
    s.seeds = [0, 1, 2]
    s.learning_rates = [1e-5]
    s.fusion = ["average", "task_arithmetic", "ties", "dare", "lorahub", "isolation"]
    s.fusion_grids = {}
    s.max_subset = 0
    s.lorahub_budget = 40
    s.isolation_p = 0.1
    s.pairs = [("eurosat", "svhn"), ("gtsrb", "mnist"), ("resisc45", "dtd"), ("cars", "sun397")]
    s.disentangle_grid = [round(-2.0 + 0.2 * i, 1) for i in range(21)]
    s.disentangle_examples = 640
    s.eval_batch_size = 256
    s.progress = True
    if arg == "tiny":
        s.name = "clip_tiny"
        s.config_arg = "b16,tiny"
        s.overrides = ()
        s.tasks = ["gtsrb", "svhn"]
        s.methods = ["lora"]
        s.seeds = [0]
        s.learning_rates = [1e-3]
        s.fusion = ["task_arithmetic"]
        s.fusion_grids = {"task_arithmetic": [{"lam": 1.0}]}
        s.pairs = [("gtsrb", "svhn")]
        s.disentangle_grid = [0.0, 1.0]
        s.disentangle_examples = 8
        s.eval_batch_size = 8
        s.progress = False
    elif arg:
        raise ValueError(f"unknown study argument {arg!r}; use '' or 'tiny'")
    return s
