"""The PyTorch way, for comparison: HF transformers + peft LoRA, AdamW, eager mode.

* ``lora``:         peft LoRA on q and v (r 16, α 32, dropout 0.1), AdamW, gradient clipping;
* ``l_lora``:       as the reference implementation does it: every peft ``LoraLayer`` is
                    wrapped so that its output is f(x; φ0) + ∂φ f(x; φ0)·(φ − φ0), computed
                    with ``torch.func.jvp`` in the layer's own trainable parameters. Layers
                    are selected by peft's ``LoraLayer`` type: modern peft's ``lora.Linear`` is
                    not an ``nn.Linear`` subclass, so an isinstance(nn.Linear) test would
                    linearize nothing;
* ``l_lora_model``: the whole readout linearized in all adapter parameters (one jvp);
* ``full``:         all vision-tower (CLIP) or all (T5) weights trained, no peft.

Precisions: ``fp32`` (TF32 matmuls allowed, as JAX's default on GPU) and ``bf16``
(``torch.autocast`` with fp32 weights). CLIP images go in already normalised (float
NCHW); the JAX side preprocesses uint8 inside its step (a negligible cost).
"""

from __future__ import annotations

import contextlib
import re
import time
from typing import Any

import numpy as np

from benchmarks import models
from benchmarks.common import Recorder, measurement, stats, time_repeated

AREA_TRAIN = "torch_train"
PEFT_TARGETS = {"clip": ["q_proj", "v_proj"], "t5": ["q", "v"]}


def torch_device() -> Any:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def hf_model(model: str, config: Any, attn: str | None = None) -> Any:
    """Random-weight HF model of ``config`` (CLIP: vision tower + projection).

    ``attn`` picks the attention implementation ("eager", "sdpa"); None = transformers' default.
    """
    import copy

    from transformers import CLIPVisionModelWithProjection, T5ForConditionalGeneration

    if attn is not None:
        config = copy.deepcopy(config)
        config._attn_implementation = attn
    if model == "clip":
        return CLIPVisionModelWithProjection(config)
    return T5ForConditionalGeneration(config)


def add_lora(
    net: Any, model: str, rank: int = 16, alpha: float = 32.0, dropout: float = 0.1
) -> Any:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=PEFT_TARGETS[model],
        bias="none",
    )
    return get_peft_model(net, cfg)


# ----------------------------------------------------------------------------- linearization


class Linearized:
    """Marker base; see :func:`linearized_module`."""


def linearized_module(module: Any) -> Any:
    """Wrap ``module`` so that it returns f(φ0) + jvp in its trainable parameters φ.

    φ0 (the parameters at wrap time) is kept as buffers; the frozen parameters (e.g. the base
    weight of a LoRA layer) have no tangent.
    """
    import torch
    from torch import nn

    class _Linearized(nn.Module, Linearized):
        def __init__(self, inner: nn.Module):
            super().__init__()
            self.inner = inner
            self.names = [n for n, p in inner.named_parameters() if p.requires_grad]
            if not self.names:
                raise ValueError(f"{type(inner).__name__} has no trainable parameters to linearize")
            for i, n in enumerate(self.names):
                self.register_buffer(f"phi0_{i}", inner.get_parameter(n).detach().clone())

        def forward(self, *args, **kwargs):
            cur = [self.inner.get_parameter(n) for n in self.names]
            phi0 = tuple(getattr(self, f"phi0_{i}") for i in range(len(self.names)))
            tangent = tuple(c - z for c, z in zip(cur, phi0))

            def f(*ps):
                return torch.func.functional_call(
                    self.inner, dict(zip(self.names, ps)), args, kwargs
                )

            out, dout = torch.func.jvp(f, phi0, tangent)
            return out + dout

    return _Linearized(module)


def linearize_lora_layers(peft_model: Any) -> int:
    """Replace every peft ``LoraLayer`` module in place by its linearized wrapper; returns count."""
    from peft.tuners.lora import LoraLayer
    from torch import nn

    targets = [
        (n, m)
        for n, m in peft_model.named_modules()
        if isinstance(m, LoraLayer) and isinstance(m, nn.Module)
    ]
    if not targets:
        raise ValueError("no peft LoraLayer found: nothing would be linearized")
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(peft_model.get_submodule(parent_name), child, linearized_module(mod))
    return len(targets)


def linearized_readout(net: Any, readout: Any, batch: dict) -> Any:
    """readout(net, batch) linearized in all trainable parameters of ``net`` around φ0.

    φ0 must have been stored as ``net._phi0`` ({name: tensor}) by :func:`prepare`.
    """
    import torch

    names = list(net._phi0)
    phi0 = tuple(net._phi0[n] for n in names)
    tangent = tuple(net.get_parameter(n) - z for n, z in zip(names, phi0))

    def f(*ps):
        params = dict(zip(names, ps))

        def call(*a, **k):
            return torch.func.functional_call(net, params, a, k)

        return readout(call, batch)

    out, dout = torch.func.jvp(f, phi0, tangent)
    return out + dout


# ----------------------------------------------------------------------------- readouts


def clip_head(config: Any, device: Any) -> dict:
    import torch

    g = torch.Generator().manual_seed(1)
    classes = torch.randn(models.N_CLASSES, config.projection_dim, generator=g)
    return {"classes": (classes / classes.norm(dim=-1, keepdim=True)).to(device), "scale": 100.0}


def clip_readout(head: dict):
    import torch.nn.functional as F  # torch is optional (a test extra)

    def readout(call, batch):
        emb = call(pixel_values=batch["pixel_values"]).image_embeds.float()
        return head["scale"] * F.normalize(emb, dim=-1) @ head["classes"].T

    return readout


def t5_train_readout(call, batch):
    return call(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        decoder_input_ids=batch["decoder_input_ids"],
    ).logits.float()


def loss_fn(model: str, logits: Any, batch: dict) -> Any:
    import torch.nn.functional as F  # torch is optional (a test extra)

    if model == "clip":
        return F.cross_entropy(logits, batch["label"])
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), batch["labels_ce"].reshape(-1), ignore_index=-100
    )


def torch_batch(model: str, arrays: dict, config: Any, device: Any) -> dict:
    """Our synthetic arrays as torch tensors in the HF layout."""
    import torch

    if model == "clip":
        from llora_jax.data import vision

        x = vision.normalize(arrays["image"].astype(np.float32))
        return {
            "pixel_values": torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
            .float()
            .to(device),
            "label": torch.from_numpy(arrays["label"]).long().to(device),
        }
    t = {k: torch.from_numpy(np.asarray(v)).long().to(device) for k, v in arrays.items()}
    labels = t["labels"]
    dec_in = torch.cat([torch.zeros_like(labels[:, :1]), labels[:, :-1]], dim=1)
    t["decoder_input_ids"] = dec_in
    t["labels_ce"] = labels.masked_fill(t["decoder_attention_mask"] == 0, -100)
    return t


# ----------------------------------------------------------------------------- train step


def prepare(model: str, method: str, config: Any, device: Any, dropout: float = 0.1) -> Any:
    """The network for ``method``, on ``device``, with only the trained parameters requiring grad.

    ``l_lora_model`` uses eager attention: the fused SDPA kernels have no forward-mode AD.
    """
    import torch

    with torch.device(device):  # initialise on the device: far faster than on the host
        net = hf_model(model, config, attn="eager" if method == "l_lora_model" else None)
    if method == "full":
        for n, p in net.named_parameters():
            p.requires_grad_(model == "t5" or n.startswith("vision_model."))
    else:
        net = add_lora(net, model, dropout=dropout)
    net = net.to(device)
    if method == "l_lora":
        net._n_linearized = linearize_lora_layers(net)
    if method == "l_lora_model":
        net._phi0 = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
    return net


def autocast(precision: str, device: Any):
    import torch

    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_step(model: str, method: str, precision: str, net: Any, config: Any, device: Any):
    import torch

    readout = clip_readout(clip_head(config, device)) if model == "clip" else t5_train_readout
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.1)
    net.train()

    def step(batch):
        with autocast(precision, device):
            if method == "l_lora_model":
                logits = linearized_readout(net, readout, batch)
            else:
                logits = readout(net, batch)
            loss = loss_fn(model, logits, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step, sum(p.numel() for p in params)


def _sync(device: Any):
    import torch

    def sync(_):
        if device.type == "cuda":
            torch.cuda.synchronize()

    return sync


def run_train(
    cases: list, rec: Recorder, *, tiny: bool, warmup: int, repeats: int, lora_dropout: float = 0.1
) -> None:
    """Time the HF/peft train step of each case (a ``train_bench.TrainCase``)."""
    import torch

    device = torch_device()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    for case in cases:
        rec.guard(
            "torch_" + case.name,
            AREA_TRAIN,
            case.config(),
            _train_one,
            case,
            rec,
            tiny,
            warmup,
            repeats,
            lora_dropout,
            device,
        )


def _train_one(case, rec, tiny, warmup, repeats, lora_dropout, device) -> None:
    import torch

    shapes = models.TINY_SHAPES if tiny else models.REAL_SHAPES
    config = models.hf_config(case.model, tiny)
    torch.manual_seed(0)
    net = prepare(case.model, case.method, config, device, lora_dropout)
    step, n_train = make_step(case.model, case.method, case.precision, net, config, device)
    arrays = models.synthetic_arrays(case.model, 2 * case.batch, shapes, config)
    batches = [
        torch_batch(
            case.model,
            {k: v[i * case.batch : (i + 1) * case.batch] for k, v in arrays.items()},
            config,
            device,
        )
        for i in range(2)
    ]
    box = {"i": 0}

    def once():
        box["i"] ^= 1
        return step(batches[box["i"]])

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    samples = time_repeated(once, _sync(device), warmup=warmup, repeats=repeats)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    med = stats(samples)["median"]
    attn = getattr(getattr(net, "config", None), "_attn_implementation", None)
    cfg = {
        **case.config(),
        "framework": "torch",
        "attn_implementation": attn,
        "tf32": device.type == "cuda",
        "optimizer": "torch.optim.AdamW (default foreach)",
    }
    derived = {
        "examples_per_s": case.batch / med,
        "peak_bytes": peak,
        "memory_source": "torch.cuda.max_memory_allocated (reset per config)",
        "n_trainable": n_train,
        "linearized_layers": getattr(net, "_n_linearized", None),
        "wall_s": time.perf_counter() - t0,
        "last_loss": float(once().detach().float().cpu()),
    }
    rec.add(measurement("torch_" + case.name, AREA_TRAIN, cfg, samples, derived=derived))
    if device.type == "cuda":
        net.cpu()
        torch.cuda.empty_cache()


def hf_path(path: str) -> str:
    """Our module path ("encoder/block_0/layer_0/SelfAttention/q") → HF module name."""
    return re.sub(r"\b(layers|block|layer)_(\d+)\b", r"\1.\2", path).replace("/", ".")
