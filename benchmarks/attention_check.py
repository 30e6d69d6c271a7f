"""Is attention_impl="auto" the fused kernel on this machine, and does it compute XLA's result?

At the real models' attention shapes, in bf16, "auto" (cuDNN's fused kernel on an NVIDIA GPU)
against "xla" (the path of before) and the float32 reference: forward, gradient, the vmapped
merge grid with a shared padding mask (which failed before) and T5's bias under vmap, CLIP's
causal text mask, a one-token decoding step, and the forward-mode AD of ``l_lora_model``
(which must take XLA's path). Each case: ‖auto − ref‖ / ‖ref‖ against ‖xla − ref‖ / ‖ref‖,
where ref is float32 XLA on the same (bf16-rounded) inputs; a case passes when auto's error
is below 1e-2 and below twice xla's + 1e-3. Plus the median time of fwd+bwd of ViT-B/16's
attention for both paths. Runs on CPU too ("auto" is then XLA's path; a smoke test).

    python -m benchmarks.attention_check --out DIR    # writes DIR/attention_check.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import versions
from llora_jax import adapters
from llora_jax.backbones import attention

BF16, F32 = jnp.bfloat16, jnp.float32


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / (np.linalg.norm(b) + 1e-30))


def _inputs(seed, b, t, s, n=12, h=64):
    keys = jax.random.split(jax.random.key(seed), 3)
    shapes = ((b, t, n, h), (b, s, n, h), (b, s, n, h))
    return [jax.random.normal(k, sh, F32).astype(BF16) for k, sh in zip(keys, shapes)]


def _lengths_mask(lengths, t, s):
    keys = np.arange(s)[None, :] < np.asarray(lengths)[:, None]
    return jnp.asarray(np.broadcast_to(keys[:, None, None, :], (len(lengths), 1, t, s)))


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x, np.float32)) for x in jax.tree.leaves(tree)])


def _case(name, f, args) -> dict:
    """f(impl, *args) for auto, xla and float32 xla (the reference)."""
    ref = jax.jit(lambda *a: f("xla", *[x.astype(F32) if x.dtype == BF16 else x for x in a]))
    got = {impl: jax.jit(lambda *a, i=impl: f(i, *a))(*args) for impl in ("auto", "xla")}
    want = ref(*args)
    err = {impl: _rel(_flat(v), _flat(want)) for impl, v in got.items()}
    ok = np.isfinite(err["auto"]) and err["auto"] < min(1e-2, 2 * err["xla"] + 1e-3)
    return {"case": name, "err_auto": err["auto"], "err_xla": err["xla"], "pass": bool(ok)}


def _attn(impl, q, k, v, bias=None, mask=None):
    return attention.fused_attention(q, k, v, bias=bias, mask=mask, scale=0.125, impl=impl)


def cases() -> list[dict]:
    out = []
    vit = _inputs(0, 8, 197, 197)
    out.append(_case("vit_fwd_T197", _attn, vit))

    def vit_grad(impl, q, k, v):
        loss = lambda *a: jnp.sum(jnp.sin(_attn(impl, *a).astype(F32)))  # noqa: E731
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    out.append(_case("vit_grad_T197", vit_grad, vit))
    # The merge grid: 4 models' q/k/v vmapped, the batch (and its padding mask) shared.
    q, k, v = (jnp.stack([x, 0.9 * x, 1.1 * x, -x]) for x in _inputs(1, 16, 64, 64))
    mask = _lengths_mask([64, 40, 7, 33] * 4, 64, 64)

    def grid(impl, q, k, v, mask):
        return jax.vmap(lambda a, b, c: _attn(impl, a, b, c, mask=mask))(q, k, v)

    out.append(_case("bert_vmapped_grid_shared_mask", grid, (q, k, v, mask)))
    q, k, v = (jnp.stack([x, 0.5 * x]) for x in _inputs(2, 8, 127, 127))
    rel = jax.random.normal(jax.random.key(3), (1, 12, 127, 127), F32)
    mask = _lengths_mask([127, 90, 31, 64] * 2, 127, 127)

    def t5_grid(impl, q, k, v, rel, mask):
        return jax.vmap(lambda a, b, c: _attn(impl, a, b, c, bias=rel, mask=mask))(q, k, v)

    out.append(_case("t5_vmapped_grid_bias_mask_T127", t5_grid, (q, k, v, rel, mask)))

    def t5_grad(impl, q, k, v, rel, mask):
        loss = lambda *a: jnp.sum(jnp.sin(_attn(impl, *a, bias=rel, mask=mask).astype(F32)))  # noqa: E731
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    out.append(_case("t5_grad_bias_mask_T127", t5_grad, (q[0], k[0], v[0], rel, mask)))
    q, k, v = _inputs(4, 8, 77, 77)
    causal = jnp.tril(jnp.ones((77, 77), bool))[None, None] & _lengths_mask([77, 20] * 4, 77, 77)
    out.append(
        _case("clip_text_causal_padding", lambda i, *a: _attn(i, *a, mask=causal), (q, k, v))
    )
    q, k, v = _inputs(5, 8, 1, 8)
    step = _lengths_mask([3] * 8, 1, 8)
    out.append(_case("t5_decode_step_T1", lambda i, *a: _attn(i, *a, mask=step), (q, k, v)))

    def forward_mode(impl, q, k, v):  # l_lora_model: jax.jvp through "auto" must take XLA
        return adapters.linearized_call(lambda x: _attn(impl, x, k, v), q, 0.1 * q)

    out.append(_case("jvp_l_lora_model_auto", forward_mode, _inputs(6, 4, 64, 64)))
    return out


def timings(repeats: int = 20) -> dict:
    """Median ms of fwd+bwd of ViT-B/16 attention at batch 256, per implementation."""
    q, k, v = _inputs(7, 256, 197, 197)
    out = {}
    for impl in ("auto", "xla"):
        loss = lambda q, k, v, i=impl: jnp.sum(_attn(i, q, k, v).astype(F32))  # noqa: E731
        f = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        jax.block_until_ready(f(q, k, v))
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(f(q, k, v))
            samples.append(time.perf_counter() - t0)
        out[impl] = 1e3 * float(np.median(samples))
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.attention_check")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--no-timing", action="store_true")
    args = p.parse_args(argv)
    platform = attention.current_platform()
    chosen = attention.choose_attention(
        "auto", platform=platform, dtype=BF16, forward_mode_ad=False, head_dim=64
    )
    result = {
        "device": str(jax.devices()[0].device_kind),
        "platform": platform,
        "auto_resolves_to": chosen,
        "versions": versions(),
        "cases": cases(),
        "timing_ms_vit_b256_attention_fwd_bwd": None if args.no_timing else timings(),
    }
    result["all_pass"] = all(c["pass"] for c in result["cases"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "attention_check.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    tmp.rename(out / "attention_check.json")
    for c in result["cases"]:
        print(f"{c['case']:36s} auto {c['err_auto']:.2e}  xla {c['err_xla']:.2e}  pass={c['pass']}")
    print(
        "auto ->",
        chosen,
        "on",
        result["device"],
        "| timing",
        result["timing_ms_vit_b256_attention_fwd_bwd"],
    )
    return result


if __name__ == "__main__":
    main()
