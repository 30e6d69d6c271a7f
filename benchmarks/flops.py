"""FLOPs and bytes of a train step: analytic counts, XLA's cost analysis, compiled memory.

Analytic count (per example, then × batch), with F = 2·tokens·d_in·d_out for each dense
layer and A = 4·q_len·k_len·inner for each attention (QKᵀ and PV):

* forward:                F for every dense layer, A for every attention, and the LoRA
                          branch s·(xA)B: Fb = 2·tokens·r·(d_in + d_out) per adapted layer;
* backward, frozen base:  F again for the activation gradient dX = dY·Wᵀ of every layer that
                          lies downstream of a trainable parameter (no weight gradients),
                          2A per attention (both operands are activations), and for LoRA
                          Fb for dA, dB plus Fb for its dX;
* full fine-tuning:       adds F for the weight gradient of every trained layer (≈ 3× forward);
* ``l_lora`` (each branch linearized): the branch costs ≈ 2.5× its forward and 2× its
                          backward — a few percent of the step at r = 16;
* ``l_lora_model`` (whole model linearized): primal forward + tangent forward (F for every
                          layer downstream of an adapter, 2A per attention) + the transpose
                          of the tangent pass (the same again) ≈ 1.5× a LoRA step;
* optimizer:              ≈ 12 FLOPs per trainable parameter (clipping + AdamW).

Layer-norms, softmax, activations and the loss are not counted (XLA counts them, so its
number is somewhat higher). The bytes estimate is the floor a step must move: frozen
weights read twice (forward, backward), ≈ 40 bytes per trainable fp32 parameter (param,
gradient, two moments), and saved activations written once and read once.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

ADAPTER_METHODS = ("lora", "l_lora", "l_lora_model")


@dataclasses.dataclass(frozen=True)
class Dense:
    name: str
    tokens: float  # per example
    d_in: int
    d_out: int
    lora: bool = False  # a LoRA target
    dx_adapter: bool = True  # activation gradient needed when only adapters train
    trained_full: bool = True  # trained by full fine-tuning
    dx_full: bool = True  # activation gradient needed under full fine-tuning


@dataclasses.dataclass(frozen=True)
class Attn:
    q_len: float
    k_len: float
    inner: int


@dataclasses.dataclass(frozen=True)
class Desc:
    """What one example costs: its dense layers, attentions and saved activations."""

    dense: tuple[Dense, ...]
    attn: tuple[Attn, ...]
    act_elems: float  # activation elements kept for the backward pass, per example


def vit_desc(vc: Any, n_classes: int, projection_dim: int) -> Desc:
    """CLIP vision tower + projection + zero-shot head (``vc``: our clip VisionConfig)."""
    d, f, h = vc.hidden_size, vc.intermediate_size, vc.num_heads
    patches = (vc.image_size // vc.patch_size) ** 2
    n = patches + 1
    dense = [
        Dense(
            "patch", patches, vc.patch_size**2 * vc.num_channels, d, dx_adapter=False, dx_full=False
        )
    ]
    attn = []
    for i in range(vc.num_layers):
        first = i == 0
        for nm in ("q", "k", "v"):
            dense.append(Dense(f"{i}/{nm}", n, d, d, lora=nm in "qv", dx_adapter=not first))
        dense += [Dense(f"{i}/o", n, d, d), Dense(f"{i}/fc1", n, d, f), Dense(f"{i}/fc2", n, f, d)]
        attn.append(Attn(n, n, d))
    dense.append(Dense("projection", 1, d, projection_dim, trained_full=False))
    dense.append(Dense("zeroshot_head", 1, projection_dim, n_classes, trained_full=False))
    act = vc.num_layers * n * (7 * d + 2 * f + h * n)
    return Desc(tuple(dense), tuple(attn), float(act))


def t5_desc(spec: Any, input_len: int, target_len: int, candidates: int = 1) -> Desc:
    """T5 encoder-decoder, teacher-forced on ``candidates`` target sequences per input.

    ``candidates`` > 1 describes rank classification (the decoder runs once per candidate
    label word on a repeated encoder output, as ``heads/t5_text`` does).
    """
    d, f, h, dkv = spec.d_model, spec.d_ff, spec.num_heads, spec.d_kv
    inner = h * dkv
    s, t = float(input_len), float(target_len * candidates)
    n_ff_in = 2 if spec.is_gated_act else 1
    dense, attn = [], []
    for i in range(spec.num_layers):
        first = i == 0
        for nm in ("q", "k", "v"):
            dense.append(Dense(f"enc{i}/{nm}", s, d, inner, lora=nm in "qv", dx_adapter=not first))
        dense.append(Dense(f"enc{i}/o", s, inner, d))
        dense += [Dense(f"enc{i}/wi{j}", s, d, f) for j in range(n_ff_in)]
        dense.append(Dense(f"enc{i}/wo", s, f, d))
        attn.append(Attn(s, s, inner))
    for i in range(spec.num_decoder_layers):
        first = i == 0
        for nm in ("q", "k", "v"):
            dense.append(
                Dense(f"dec{i}/self_{nm}", t, d, inner, lora=nm in "qv", dx_adapter=not first)
            )
        dense.append(Dense(f"dec{i}/self_o", t, inner, d))
        attn.append(Attn(t, target_len, inner))  # each candidate attends to itself
        dense.append(Dense(f"dec{i}/cross_q", t, d, inner, lora=True))
        # Cross keys/values read the encoder output: once per candidate sequence.
        dense.append(Dense(f"dec{i}/cross_k", s * candidates, d, inner))
        dense.append(Dense(f"dec{i}/cross_v", s * candidates, d, inner, lora=True))
        dense.append(Dense(f"dec{i}/cross_o", t, inner, d))
        attn.append(Attn(t, s, inner))
        dense += [Dense(f"dec{i}/wi{j}", t, d, f) for j in range(n_ff_in)]
        dense.append(Dense(f"dec{i}/wo", t, f, d))
    dense.append(Dense("lm_head", t, d, spec.vocab_size))
    act = spec.num_layers * s * (7 * d + (n_ff_in + 1) * f + h * s)
    act += spec.num_decoder_layers * t * (12 * d + (n_ff_in + 1) * f + h * (t + s))
    act += t * spec.vocab_size  # logits
    return Desc(tuple(dense), tuple(attn), float(act))


def _branch(layer: Dense, rank: int) -> float:
    return 2.0 * layer.tokens * rank * (layer.d_in + layer.d_out)


def forward_flops(desc: Desc, rank: int = 0, adapters: bool = True) -> float:
    """FLOPs of one forward pass of one example (adapters as plain LoRA branches)."""
    total = sum(2.0 * m.tokens * m.d_in * m.d_out for m in desc.dense)
    total += sum(4.0 * a.q_len * a.k_len * a.inner for a in desc.attn)
    if adapters:
        total += sum(_branch(m, rank) for m in desc.dense if m.lora)
    return total


def train_flops(
    desc: Desc, method: str, batch: int, rank: int, n_trainable: int
) -> dict[str, float]:
    """Analytic FLOPs of one train step (forward, backward, optimizer, total)."""
    fwd = bwd = 0.0
    adapters = method in ADAPTER_METHODS
    for m in desc.dense:
        f = 2.0 * m.tokens * m.d_in * m.d_out
        fb = _branch(m, rank) if (adapters and m.lora) else 0.0
        dx = m.dx_adapter if adapters else m.dx_full
        fwd += f
        if method == "full":
            bwd += f * dx + f * m.trained_full
        elif method == "lora":
            fwd += fb
            bwd += f * dx + fb * (1 + dx)
        elif method == "l_lora":
            fwd += 2.5 * fb
            bwd += f * dx + 2 * fb * (1 + dx)
        elif method == "l_lora_model":
            # primal, then tangent forward and its transpose (only downstream of an adapter)
            fwd += fb + (f + 2 * fb) * dx
            bwd += (f + 2 * fb) * dx + fb
        else:
            raise ValueError(f"unknown method {method!r}")
    for a in desc.attn:
        att = 4.0 * a.q_len * a.k_len * a.inner
        if method == "l_lora_model":
            fwd += 3 * att
            bwd += 2 * att
        else:
            fwd += att
            bwd += 2 * att
    opt = 12.0 * n_trainable
    return {
        "forward": fwd * batch,
        "backward": bwd * batch,
        "optimizer": opt,
        "total": (fwd + bwd) * batch + opt,
        "per_example": fwd + bwd,
    }


def train_bytes(
    desc: Desc, batch: int, n_frozen: int, frozen_bytes: int, n_trainable: int, act_bytes: int
) -> float:
    """Floor of the bytes one train step moves through device memory (see module doc)."""
    return (
        2.0 * n_frozen * frozen_bytes
        + 40.0 * n_trainable
        + 2.0 * desc.act_elems * batch * act_bytes
    )


# ----------------------------------------------------------------------------- XLA


def xla_cost(compiled: Any) -> dict[str, float | None]:
    """FLOPs and bytes accessed from XLA's cost analysis of a compiled executable."""
    try:
        ca = compiled.cost_analysis()
    except Exception:  # noqa: BLE001  (not every backend implements it)
        return {"flops": None, "bytes_accessed": None, "transcendentals": None}
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    ca = ca or {}
    get = lambda k: float(ca[k]) if k in ca else None  # noqa: E731
    return {
        "flops": get("flops"),
        "bytes_accessed": get("bytes accessed"),
        "transcendentals": get("transcendentals"),
    }


def compiled_memory(compiled: Any) -> dict[str, int | None]:
    """Device memory of a compiled executable (XLA's buffer assignment, no run needed).

    ``peak_estimate`` = arguments + outputs − aliased (donated) + temporaries; this is what
    the train step needs on top of nothing else. XLA's own ``peak_memory_in_bytes`` is kept
    too where the backend reports it.
    """
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        m = None
    if m is None:
        return {"peak_estimate": None}
    g = lambda k: int(getattr(m, k, 0) or 0)  # noqa: E731
    out = {
        "argument": g("argument_size_in_bytes"),
        "output": g("output_size_in_bytes"),
        "alias": g("alias_size_in_bytes"),
        "temp": g("temp_size_in_bytes"),
        "generated_code": g("generated_code_size_in_bytes"),
        "xla_peak": g("peak_memory_in_bytes") or None,
    }
    out["peak_estimate"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def matmul_peak(
    n: int = 8192, dtype: str = "bfloat16", repeats: int = 20, warmup: int = 3
) -> dict[str, Any]:
    """Median FLOP/s of an n³ ``jnp.dot`` on random inputs (default device, default precision)."""
    import jax
    import jax.numpy as jnp

    from benchmarks.common import stats, time_repeated

    dt = jnp.dtype(dtype)
    keys = jax.random.split(jax.random.key(0), 4)
    # Two input pairs, alternated: a repeated product on one buffer could be served from cache.
    xs = [jax.random.normal(k, (n, n), jnp.float32).astype(dt) for k in keys]
    f = jax.jit(jnp.dot)
    state = {"i": 0}

    def once():
        state["i"] ^= 1
        i = 2 * state["i"]
        return f(xs[i], xs[i + 1])

    t0 = time.perf_counter()
    samples = time_repeated(once, jax.block_until_ready, warmup=warmup, repeats=repeats)
    s = stats(samples)
    flops = 2.0 * n**3
    return {
        "samples": samples,
        "flops": flops,
        "flop_per_s": flops / s["median"],
        "setup_s": time.perf_counter() - t0,
        "n": n,
        "dtype": dtype,
    }


def num_params(tree: Any) -> int:
    import jax

    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))
