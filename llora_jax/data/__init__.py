"""Data: vision and GLUE tasks from tfds (no TensorFlow) or local files, formats, batches.

Typical use::

    from llora_jax import data
    train = data.load_task("cola", "train")              # LLORA_DATA_DIR or tfds
    arrays = data.t5_arrays(train, train.examples, tokenizer)
    for batch in data.prefetch_to_device(data.batches(arrays, 16, seed=0, epochs=None)):
        ...

    test = data.load_task("gtsrb", "test")               # local npz
    it = data.batches(test, 64, shuffle=False, drop_remainder=False,
                      transform=data.image_transform(224))

    dtd = data.load_task("dtd", "train", source="hf")   # or "hf:<id|dir>", "folder:<root>"
    it = streaming.make_batch_iterator(dtd, 128, seed=0, image_size=224, worker_count=4)
    batch = next(it); state = it.get_state()             # grain: checkpointable position
"""

from llora_jax.data.glue import (
    as_spec,
    encoder_format,
    format_score,
    parse_predictions,
    stsb_round,
    t5_format,
    t5_targets,
)
from llora_jax.data.loading import SPLITS, TaskData, carve, load_task
from llora_jax.data.metrics import (
    accuracy,
    compute_metrics,
    f1_binary,
    matthews_corrcoef,
    pearson,
    spearman,
)
from llora_jax.data.pipeline import batches, prefetch_to_device, steps_per_epoch
from llora_jax.data.sources import ENV_VAR, DataError, DataNotFoundError
from llora_jax.data.tasks import (
    GLUE_TASKS,
    VISION_TASKS,
    TaskSpec,
    canonical_name,
    get_task,
    task_names,
)
from llora_jax.data.tokenize import encoder_arrays, t5_arrays, tokenize
from llora_jax.data.vision import (
    CLIP_MEAN,
    CLIP_STD,
    PAPER_TEMPLATE,
    class_names,
    image_transform,
    normalize,
    preprocess_on_device,
    prompts,
    resize_center_crop,
    templates,
)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "ENV_VAR",
    "GLUE_TASKS",
    "PAPER_TEMPLATE",
    "SPLITS",
    "VISION_TASKS",
    "DataError",
    "DataNotFoundError",
    "TaskData",
    "TaskSpec",
    "accuracy",
    "as_spec",
    "batches",
    "canonical_name",
    "carve",
    "class_names",
    "compute_metrics",
    "encoder_arrays",
    "encoder_format",
    "f1_binary",
    "format_score",
    "get_task",
    "image_transform",
    "load_task",
    "matthews_corrcoef",
    "normalize",
    "parse_predictions",
    "pearson",
    "prefetch_to_device",
    "preprocess_on_device",
    "prompts",
    "resize_center_crop",
    "spearman",
    "steps_per_epoch",
    "stsb_round",
    "t5_arrays",
    "t5_format",
    "t5_targets",
    "task_names",
    "templates",
    "tokenize",
]
