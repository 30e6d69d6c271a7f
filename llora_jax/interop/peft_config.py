"""PEFT ``adapter_config.json``: what llora-jax can represent, and per-layer scales.

Every field of PEFT's ``LoraConfig`` falls in one of three groups:

* used: ``r``, ``lora_alpha``, ``use_rslora``, ``rank_pattern``, ``alpha_pattern``,
  ``target_modules``, ``fan_in_fan_out``, ``base_model_name_or_path``, ``peft_type``,
  ``revision``, ``lora_dropout`` (recorded; dropout is off at inference);
* refused when not at their inert default (they change what the adapter computes
  or add trained weights outside A and B): see ``REFUSED``;
* ignored: fields that only choose which modules get LoRA (the saved weights already
  say which), initialisations that leave W0 alone (the saved A, B are final), or
  library bookkeeping.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

CONFIG_FILE = "adapter_config.json"

# field -> (value(s) that are inert, why anything else cannot be imported)
REFUSED: dict[str, tuple[tuple[Any, ...], str]] = {
    "use_dora": ((False, None), "DoRA rescales each column of W0 + ΔW by a learned magnitude"),
    "bias": (("none", None), "trained bias vectors are not part of a LoRA adapter tree"),
    "lora_bias": ((False, None), "a trained bias on lora_B is not part of a LoRA adapter tree"),
    "modules_to_save": ((None, (), []), "fully trained extra modules are not LoRA factors"),
    "trainable_token_indices": ((None, {}, []), "trained embedding rows are not LoRA factors"),
    "layer_replication": ((None, [], ()), "replicated layers change the backbone's depth"),
    "target_parameters": ((None, [], ()), "LoRA on raw parameters (MoE experts) is unsupported"),
    "use_qalora": ((False, None), "QA-LoRA pools the input; its A has another shape"),
    "use_bdlora": ((None, False), "block-diagonal LoRA is not a plain A, B pair"),
    "alora_invocation_tokens": ((None,), "activated LoRA switches on per token"),
    "megatron_config": ((None,), "Megatron-parallel layers are not HF linear layers"),
    # These initialisations subtract s·A0·B0 from W0 while training, so the adapter is only
    # right on a modified base model (unless PEFT converted it back, which the file does not say).
    "init_lora_weights": (
        (True, False, None, "gaussian", "eva", "orthogonal"),
        "PiSSA / OLoRA / CorDA / LoftQ / LoRA-GA initialisation changes the base weights",
    ),
    "arrow_config": ((None,), "Arrow routes among several LoRA experts per token"),
    "kasa_config": ((None,), "KaSA adds a trained singular-value vector between A and B"),
    "monteclora_config": ((None,), "MonteCLoRA samples its factors"),
    "velora_config": ((None,), "VeLoRA layers are not verified to compute s·B·A"),
}


class PeftImportError(ValueError):
    """A PEFT adapter cannot be represented exactly; the message names the field and adapter."""


def read_config(adapter_dir: Path) -> dict:
    file = adapter_dir / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} does not exist; a PEFT adapter directory holds {CONFIG_FILE}"
        )
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise PeftImportError(f"{file} is not valid JSON ({err})") from err


def check_config(cfg: dict, where: str) -> None:
    """Refuse, naming the field and ``where`` (the adapter), what cannot be imported exactly."""
    peft_type = str(cfg.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise PeftImportError(
            f"{where}: peft_type is {cfg.get('peft_type')!r}; only LORA adapters can be imported "
            "(IA3, LoHa, LoKr, prompt/prefix tuning have no A, B factors)"
        )
    for field, (inert, why) in REFUSED.items():
        value = cfg.get(field)
        if value not in inert:
            raise PeftImportError(
                f"{where}: adapter_config.json field {field}={value!r} cannot be imported: {why}"
            )
    for field in ("r", "lora_alpha"):
        if not isinstance(cfg.get(field), (int, float)) or cfg[field] <= 0:
            raise PeftImportError(f"{where}: adapter_config.json field {field} must be > 0")


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    # PEFT's rule (peft.utils.other.get_pattern_key): the first key k such that the module name
    # ends with k on a dot boundary, k read as a regular expression.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def layer_rank_alpha(cfg: dict, module: str) -> tuple[int, float]:
    """(r, α) PEFT gives the module named ``module`` (relative to the wrapped model)."""
    r = _pattern_value(cfg.get("rank_pattern") or {}, module, cfg["r"])
    alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"])
    return int(r), float(alpha)


def layer_scale(cfg: dict, module: str) -> float:
    """α/r, or α/√r with ``use_rslora``, for one module (PEFT's ``LoraLayer.update_layer``)."""
    r, alpha = layer_rank_alpha(cfg, module)
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
