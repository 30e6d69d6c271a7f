"""Task families: how a frozen backbone becomes a task model (readout, encoding, build).

One module per family, each with ``build(backbone, tokenizer, splits, *, method, lora,
limits, …) -> Experiment`` taking explicit arguments; the registry maps a backbone kind
to its builder and default LoRA targets.
"""

from llora_jax.backbones import bert, clip, t5
from llora_jax.tasks import clip_zeroshot, t5_text, text_encoder
from llora_jax.tasks.base import Experiment, limit_rows

BUILDERS = {
    "text_encoder": text_encoder.build,
    "t5": t5_text.build,
    "clip": clip_zeroshot.build,
}
KINDS = tuple(BUILDERS)
DEFAULT_LORA_TARGETS = {
    "text_encoder": bert.DEFAULT_LORA_TARGETS,
    "t5": t5.DEFAULT_LORA_TARGETS,
    "clip": clip.DEFAULT_LORA_TARGETS,
}

__all__ = ["BUILDERS", "DEFAULT_LORA_TARGETS", "KINDS", "Experiment", "limit_rows"]
