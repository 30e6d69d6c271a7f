"""The text study: all-MiniLM-L6-v2 (real weights), frozen label heads, local GLUE tasks.

get_study("")     the full study (make reproduce-text): the six GLUE tasks of
                  LLORA_DATA_DIR (named: the directory holds 20), 4 methods, 3 seeds,
                  6 fusion methods, 4 pairs.
get_study("demo") the quick form (make demo): 3 tasks, 1 seed, LoRA vs L-LoRA,
                  task arithmetic and TIES, one disentanglement heatmap.
get_study("tiny") seconds-long smoke test (tests; pass a tiny backbone by override).
"""

from llora_jax.study.spec import base_study


def _lams(step: float = 0.1) -> list[float]:
    return [round(step * i, 2) for i in range(int(round(1 / step)) + 1)]


def get_study(arg=None):
    s = base_study("text_minilm", "configs/minilm.py")
    # Named explicitly: LLORA_DATA_DIR holds 20 text tasks, and every subset of 20 is a
    # million fusion searches.
    s.tasks = ["cola", "mrpc", "qqp", "rte", "sst2", "stsb"]
    # (dotted config key, value) pairs: ConfigDict keys cannot hold dots.
    s.overrides = (
        ("steps", 500),
        ("batch_size", 32),
        ("data.max_len", 64),
        ("data.val_max", 300),
        ("data.eval_limit", 1000),
        ("log_every", 100),
        # A run takes seconds on a GPU: its task vector is the checkpoint (a re-run
        # skips finished runs), so no Orbax checkpoints are written.
        ("ckpt_every", 0),
        # A run's final evaluation in the analysis' batch shape (32 packed rows, below):
        # the two share one compiled predict program per method.
        ("eval_batch_size", 32),
    )
    # One sweep for all methods (matched budgets), run on seed 0; the rate chosen there on
    # validation (per method and task) is reused for seeds 1 and 2.
    s.learning_rates = [1e-4, 1e-3]
    s.lr_sweep_seeds = [0]
    # The paper's comparison first: an interrupted study has LoRA vs L-LoRA measured.
    s.methods = ["lora", "l_lora", "full", "l_lora_model"]
    # Fusion and disentanglement on every seed: seed 0 of every method first, then seeds
    # 1 and 2 (the runner's order), so an interrupted study has every method once.
    s.analysis_seeds = []
    # Every fusion method on every subset of 2..6 tasks (the runner's default).
    s.fusion_grids = {
        "task_arithmetic": [{"lam": lam} for lam in _lams()],
        "ties": [{"k": k, "lam": lam} for k in (0.25, 0.5, 1.0) for lam in _lams()],
        "dare": [
            {"p": p, "lam": lam, "base": "task_arithmetic", "key": 0}
            for p in (0.3, 0.7)
            for lam in _lams()
        ],
        "isolation": [{"p": 0.1, "lam": lam} for lam in _lams()],
    }
    s.pairs = [("cola", "mrpc"), ("cola", "rte"), ("mrpc", "rte"), ("mrpc", "sst2")]
    # Evaluation packs several sentences per 64-token row (llora_jax.evaluation.packing): a batch is
    # 32 packed rows, and 32 merged models share one call (65k tokens). On an H200 this was
    # 1.54x faster than 160 length-sorted, trimmed rows × 12 models, and compiled one
    # program instead of three (benchmarks/text_eval_bench.py).
    s.eval_batch_size = 32
    s.eval_chunk = 32
    if arg == "demo":
        # Sized for a 2-core CPU (about 25 TFLOP in all, ~8 minutes): short inputs, 80 steps,
        # small validation/test subsets. Numbers from it are a smoke test, not a result.
        s.name = "demo"
        s.tasks = ["sst2", "cola", "qqp"]
        s.methods = ["lora", "l_lora"]
        s.seeds = [0]
        s.learning_rates = [1e-3]
        s.overrides = (
            ("steps", 80),
            ("batch_size", 16),
            ("data.max_len", 32),
            ("data.train_limit", 1280),
            ("data.val_size", 48),
            ("data.eval_limit", 128),
            ("log_every", 10),
            ("ckpt_every", 40),
            ("optim.warmup_steps", 8),
            ("eval_batch_size", 16),  # = the analysis' (below): one predict program
        )
        s.fusion = ["task_arithmetic", "ties"]
        s.fusion_grids = {
            "task_arithmetic": [{"lam": lam} for lam in (0.4, 0.6, 0.8, 1.0)],
            "ties": [{"k": 0.5, "lam": lam} for lam in (0.4, 0.6, 0.8, 1.0)],
        }
        s.pairs = [("sst2", "qqp")]
        s.disentangle_grid = [-2.0, -1.0, 0.0, 1.0, 2.0]
        s.disentangle_examples = 32
        # Packed rows of 32 tokens: 48 validation sentences fill about 22, 128 test ones 60.
        s.eval_batch_size = 16
        s.eval_chunk = 8
    elif arg == "cpu":
        # The largest form that fits a 2-core CPU in about half an hour: the demo's sizes,
        # three seeds, every subset of three tasks, two disentanglement pairs.
        demo = get_study("demo")
        for k in (
            "overrides",
            "methods",
            "learning_rates",
            "fusion",
            "fusion_grids",
            "disentangle_grid",
            "disentangle_examples",
            "eval_batch_size",
            "eval_chunk",
        ):
            setattr(s, k, getattr(demo, k))
        s.name = "text_minilm_cpu"
        s.tasks = ["cola", "mrpc", "sst2"]
        s.seeds = [0, 1, 2]
        s.lr_sweep_seeds = []
        s.analysis_seeds = []
        s.fusion_subsets = {}
        s.pairs = [("cola", "mrpc"), ("mrpc", "sst2")]
    elif arg == "tiny":
        s.name = "tiny"
        s.config_arg = "tiny"
        s.overrides = ()
        s.tasks = ["sst2", "mrpc", "rte"]
        s.seeds = [0]
        s.learning_rates = [1e-2]
        s.fusion_grids = {
            "task_arithmetic": [{"lam": 0.5}, {"lam": 1.0}],
            "ties": [{"k": 0.5, "lam": 1.0}],
            "dare": [{"p": 0.5, "lam": 1.0, "base": "task_arithmetic", "key": 0}],
            "isolation": [{"p": 0.1, "lam": 0.5}],
        }
        s.lorahub_budget = 4
        s.pairs = [("mrpc", "sst2"), ("no_such", "sst2")]
        s.disentangle_grid = [-1.0, 0.0, 1.0]
        s.disentangle_examples = 8
        s.eval_batch_size = 8
        s.progress = False
    elif arg:
        raise ValueError(f"unknown study argument {arg!r}; use '', 'demo', 'cpu' or 'tiny'")
    return s
