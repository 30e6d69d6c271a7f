"""The paper's language study: Flan-T5-base, 7 GLUE tasks as text-to-text.

For machines with internet (hub weights; tfds GLUE, or LLORA_DATA_DIR for the six
tasks we have locally) and accelerators. Reference hyper-parameters live in
configs/t5.py (Adam, lr 1e-5..4e-5, batch 16, 2000 steps, r 16, alpha 32, q and v).
get_study("tiny") is the smoke test used by the tests.
"""

from llora_jax.study.spec import base_study, tiny_study

TASKS = ["cola", "mnli", "mrpc", "qqp", "rte", "sst2", "stsb"]


def get_study(arg=None):
    s = base_study("flan_t5_base", "configs/t5.py", "base")
    s.overrides = (("data.eval_limit", 1000), ("data.val_max", 500))
    s.tasks = TASKS
    s.learning_rates = [1e-5, 2e-5, 3e-5, 4e-5]
    s.pairs = [("cola", "mrpc"), ("cola", "rte"), ("mrpc", "rte"), ("mrpc", "sst2")]
    if arg == "tiny":
        return tiny_study(s, ["rte", "mrpc"], "l_lora", "ties", [{"k": 0.5, "lam": 1.0}])
    if arg:
        raise ValueError(f"unknown study argument {arg!r}; use '' or 'tiny'")
    return s
