"""The paper's language study: Flan-T5-base, 7 GLUE tasks as text-to-text.

For machines with internet (hub weights; tfds GLUE, or LLORA_DATA_DIR for the six
tasks we have locally) and accelerators. Reference hyper-parameters live in
configs/t5.py (Adam, lr 1e-5..4e-5, batch 16, 2000 steps, r 16, alpha 32, q and v).
get_study("tiny") is the smoke test used by the tests.
"""

from ml_collections import ConfigDict

TASKS = ["cola", "mnli", "mrpc", "qqp", "rte", "sst2", "stsb"]


def get_study(arg=None):
    s = ConfigDict()
    s.name = "flan_t5_base"
    s.config = "configs/t5.py"
    s.config_arg = "base"
    s.overrides = (("data.eval_limit", 1000), ("data.val_max", 500))
    s.tasks = TASKS
    s.methods = ["full", "lora", "l_lora", "l_lora_model"]
    s.seeds = [0, 1, 2]
    s.learning_rates = [1e-5, 2e-5, 3e-5, 4e-5]
    s.fusion = ["average", "task_arithmetic", "ties", "dare", "lorahub", "isolation"]
    s.fusion_grids = {}
    s.max_subset = 0
    s.lorahub_budget = 40
    s.isolation_p = 0.1
    s.pairs = [("cola", "mrpc"), ("cola", "rte"), ("mrpc", "rte"), ("mrpc", "sst2")]
    s.disentangle_grid = [round(-2.0 + 0.2 * i, 1) for i in range(21)]
    s.disentangle_examples = 640
    s.eval_batch_size = 128
    s.progress = True
    if arg == "tiny":
        s.name = "t5_tiny"
        s.config_arg = "base,tiny"
        s.overrides = ()
        s.tasks = ["rte", "mrpc"]
        s.methods = ["l_lora"]
        s.seeds = [0]
        s.learning_rates = [1e-3]
        s.fusion = ["ties"]
        s.fusion_grids = {"ties": [{"k": 0.5, "lam": 1.0}]}
        s.pairs = [("rte", "mrpc")]
        s.disentangle_grid = [0.0, 1.0]
        s.disentangle_examples = 8
        s.eval_batch_size = 8
        s.progress = False
    elif arg:
        raise ValueError(f"unknown study argument {arg!r}; use '' or 'tiny'")
    return s
