"""The shared vocabulary of the package: task models, adapter specs, fine-tuning methods.

A frozen backbone + a readout = a task model that any fine-tuning method drives. The
readout turns backbone calls into task outputs (class logits, label-word scores, token
logits); it receives ``call``, a function that runs the backbone with whatever weights or
adapter the method uses (``forward.forward``), so one readout serves full fine-tuning,
LoRA, L-LoRA and the whole-model linearization.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax

from llora_jax.adapters import LoraConfig

PyTree = Any

METHODS = ("full", "lora", "l_lora", "l_lora_model")


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(
            f"unknown fine-tuning method {method!r}; valid methods: {', '.join(METHODS)}"
        )
    return method


@dataclasses.dataclass(frozen=True)
class TaskModel:
    """Everything about a model for one task that is not trained.

    readout(call, batch, head, train) -> outputs (a dict; "logits" for classification)
    loss(outputs, batch) -> per-example loss, shape (B,)
    predict(outputs, batch) -> per-example predictions, shape (B,)
    """

    module: nn.Module
    params: PyTree
    readout: Callable[..., dict]
    loss: Callable[[dict, dict], jax.Array]
    predict: Callable[[dict, dict], jax.Array]
    head: PyTree = None
    base_model: str = "unknown"
    # Restrict full fine-tuning to these parameter paths (regexes); () = all.
    full_ft_targets: tuple[str, ...] = ()
    # The readout also takes packed batches (``llora_jax.evaluation.packing``: several inputs per
    # row, predictions shaped like the batch's slots); evaluation then packs token inputs.
    packable: bool = False


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """How the trainable part is attached."""

    method: str = "lora"
    lora: LoraConfig = LoraConfig()

    @property
    def mode(self) -> str:
        return self.method


def functions_key(tm: TaskModel, spec: AdapterSpec) -> tuple:
    """What a compiled program of this task model depends on besides its arguments.

    Weights and heads are passed as arguments, so task models that share these
    functions (e.g. every task of one sentence encoder) can share compiled programs.
    """
    return (tm.module, tm.readout, tm.loss, tm.predict, spec)
