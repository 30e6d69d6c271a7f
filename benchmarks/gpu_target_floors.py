"""The two numbers of each issue-22 target (``benchmarks/flops.py``), as a markdown table.

FLOPs are analytic (``flops.train_flops`` / ``flops.forward_flops``); the bytes floor is
``flops.train_bytes`` for a train step and, for evaluation, the frozen weights read once plus
activations written once; "scores" is the traffic of the attention probabilities that XLA's
unfused path adds and a fused kernel removes: per score element (batch x heads x T x S) about
12 B in a forward (fp32 logits written and read, bf16 probabilities written and read) and 28 B
in a train step (that, plus the backward's fp32 dP and bf16 dS). Times at the bf16 matmul peak
and HBM bandwidth given (defaults: the H100's measured 621 TFLOP/s, ~3.0 TB/s).

    python -m benchmarks.gpu_target_floors [--peak-tflops 621] [--tbps 3.0]
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp

from benchmarks import flops, models

RANK = 16


def _descs() -> dict[str, flops.Desc]:
    clip = models.backbone_module("clip").module_from_hf_config(
        models.hf_config("clip"), dtype=jnp.bfloat16
    )
    t5 = models.backbone_module("t5").module_from_hf_config(
        models.hf_config("t5"), dtype=jnp.bfloat16
    )
    s = models.REAL_SHAPES
    return {
        "clip": flops.vit_desc(clip.vision, models.N_CLASSES, clip.projection_dim),
        "t5": flops.t5_desc(t5.spec, s.input_len, s.target_len),
        "t5_rank": flops.t5_desc(
            t5.spec, s.input_len, s.target_len, candidates=len(models.LABEL_WORDS)
        ),
    }


def _weights(desc: flops.Desc) -> tuple[int, int]:
    """(frozen dense weights, LoRA parameters at RANK) of one model."""
    frozen = sum(m.d_in * m.d_out for m in desc.dense)
    lora = sum(RANK * (m.d_in + m.d_out) for m in desc.dense if m.lora)
    return frozen, lora


def _scores(desc: flops.Desc, head_dim: int = 64) -> float:
    return sum(a.inner / head_dim * a.q_len * a.k_len for a in desc.attn)


def rows() -> list[dict]:
    d = _descs()
    out = []
    for name, model, method, batch in (
        ("ViT-B/16 lora bf16 b128 (step)", "clip", "lora", 128),
        ("ViT-B/16 l_lora bf16 b128 (step)", "clip", "l_lora", 128),
        ("ViT-B/16 lora bf16 b256 (step)", "clip", "lora", 256),
        ("Flan-T5-base lora bf16 b64 (step)", "t5", "lora", 64),
        ("Flan-T5-base l_lora bf16 b64 (step)", "t5", "l_lora", 64),
    ):
        frozen, lora = _weights(d[model])
        fl = flops.train_flops(d[model], method, batch, RANK, lora)["total"]
        by = flops.train_bytes(d[model], batch, frozen, 2, lora, 2)
        out.append(
            {"what": name, "flops": fl, "bytes": by, "scores": 28 * _scores(d[model]) * batch}
        )
    frozen, _ = _weights(d["clip"])
    per = flops.forward_flops(d["clip"], RANK)
    act = d["clip"].act_elems * 2 / 2  # written once, bf16, forward only (about half saved)
    out.append(
        {"what": "CLIP merge grid, 1 model x 1024 images", "flops": per * 1024,
         "bytes": 2 * frozen + act * 1024, "scores": 12 * _scores(d["clip"]) * 1024}
    )  # fmt: skip
    for k in (21, 441):
        last = out[-1] if k == 21 else out[-2]
        out.append(
            {
                "what": f"CLIP merge grid, batched K = {k}",
                **{x: last[x] * k for x in ("flops", "bytes", "scores")},
            }
        )
    frozen, _ = _weights(d["t5_rank"])
    evals = 2 * (21 * 21 + 21)  # the joint grid and a single-task sweep, on each dataset
    per = flops.forward_flops(d["t5_rank"], RANK)
    out.append(
        {"what": "T5 21x21 l_lora disentanglement, 2 x 640", "flops": per * 640 * evals,
         "bytes": (2 * frozen + d["t5_rank"].act_elems * 640) * evals,
         "scores": 12 * _scores(d["t5_rank"]) * 640 * evals}
    )  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_target_floors")
    p.add_argument("--peak-tflops", type=float, default=621.0)
    p.add_argument("--tbps", type=float, default=3.0)
    a = p.parse_args(argv)
    print(
        f"| what | TFLOP | GB floor | XLA scores GB | t(FLOP) @{a.peak_tflops:g} | t(bytes) @{a.tbps:g} TB/s | t(scores) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows():
        t = lambda x, rate: x / rate  # noqa: E731
        fl, by, sc = r["flops"], r["bytes"], r["scores"]
        cells = [f"{fl / 1e12:.2f}", f"{by / 1e9:.1f}", f"{sc / 1e9:.1f}"]
        cells += [
            _fmt(t(fl, a.peak_tflops * 1e12)),
            _fmt(t(by, a.tbps * 1e12)),
            _fmt(t(sc, a.tbps * 1e12)),
        ]
        print(f"| {r['what']} | " + " | ".join(cells) + " |")


def _fmt(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.1f} s"


if __name__ == "__main__":
    main()
