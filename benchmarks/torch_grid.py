"""The PyTorch merge-grid baseline: one merged model at a time through HF + peft.

For each merged model φ0 + λ1τ1 + λ2τ2 the peft LoRA weights are overwritten in place
(``torch.no_grad``), then the model predicts every example: CLIP zero-shot argmax, T5 rank
classification of the label words (as ``heads/t5_text`` does: one encoder pass, every
candidate teacher-forced). ``.cpu()`` of the predictions synchronises each model.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from benchmarks import models as model_shapes
from benchmarks.common import Recorder, measurement
from benchmarks.torch_baseline import (
    autocast,
    clip_head,
    clip_readout,
    prepare,
    torch_batch,
    torch_device,
)

AREA_GRID = "torch_grid"


def t5_rank_predict(net: Any, batch: dict, words: dict) -> Any:
    """Rank classification of the candidate label words (as heads/t5_text does)."""
    import torch

    base = net.get_base_model() if hasattr(net, "get_base_model") else net
    ids, mask = batch["input_ids"], batch["attention_mask"]
    b, (c, t) = ids.shape[0], words["ids"].shape
    enc = base.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    labels = words["ids"][None].expand(b, c, t).reshape(b * c, t)
    lmask = words["mask"][None].expand(b, c, t).reshape(b * c, t)
    labels = labels.masked_fill(lmask == 0, 0)
    dec_in = torch.cat([torch.zeros_like(labels[:, :1]), labels[:, :-1]], dim=1)
    logits = base(
        encoder_outputs=(enc.repeat_interleave(c, 0),),
        attention_mask=mask.repeat_interleave(c, 0),
        decoder_input_ids=dec_in,
    ).logits
    logp = torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None])[..., 0]
    return (logp * lmask).reshape(b, c, t).sum(-1).argmax(-1)


def lora_params(net: Any) -> list[Any]:
    return [p for n, p in net.named_parameters() if "lora_" in n]


def run_grid(models: list[str], rec: Recorder, *, tiny: bool, settings: Any) -> dict:
    """One merged model at a time: load φ0 + λ1τ1 + λ2τ2 into the peft LoRA weights, predict."""
    st = settings
    device = torch_device()
    out = {}
    for model in models:
        name = f"torch_grid/{model}/lora/one_at_a_time"
        cfg = {
            "model": model,
            "method": "lora",
            "precision": st.precision,
            "framework": "torch",
            "n_examples": st.n_examples,
            "eval_batch": st.eval_batch,
            "timed_models": min(max(st.ks), st.one_at_a_time),
        }
        preds = rec.guard(name, AREA_GRID, cfg, _grid_one, model, name, cfg, st, rec, tiny, device)
        if preds is not None:
            out[model] = preds
    return out


def _grid_one(model, name, cfg, st, rec, tiny, device) -> np.ndarray:
    import torch

    from benchmarks.grid_bench import pick_lambdas

    shapes = model_shapes.TINY_SHAPES if tiny else model_shapes.REAL_SHAPES
    n_sub = cfg["timed_models"]
    config = model_shapes.hf_config(model, tiny)
    torch.manual_seed(0)
    net = prepare(model, "lora", config, device, dropout=0.0).eval()
    params = lora_params(net)
    phi0 = [p.detach().clone() for p in params]
    g = torch.Generator().manual_seed(5)
    taus = [
        [0.02 * st.tau_scale * torch.randn(p.shape, generator=g).to(device) for p in params]
        for _ in range(2)
    ]
    arrays = model_shapes.synthetic_arrays(model, st.n_examples, shapes, config, seed=3)
    head = clip_head(config, device) if model == "clip" else None
    words = None
    if model == "t5":
        w = model_shapes.WordTokenizer(config.vocab_size)(
            list(model_shapes.LABEL_WORDS), shapes.target_len
        )
        words = {
            "ids": torch.from_numpy(w["input_ids"]).long().to(device),
            "mask": torch.from_numpy(w["attention_mask"]).long().to(device),
        }
    chunks = [
        torch_batch(model, {k: v[i : i + st.eval_batch] for k, v in arrays.items()}, config, device)
        for i in range(0, st.n_examples, st.eval_batch)
    ]

    @torch.no_grad()
    def predict_all(lam):
        for p, p0, t1, t2 in zip(params, phi0, *taus):
            p.copy_(p0 + float(lam[0]) * t1 + float(lam[1]) * t2)
        preds = []
        with autocast(st.precision, device):
            for bt in chunks:
                if model == "clip":
                    preds.append(clip_readout(head)(net, bt).argmax(-1))
                else:
                    preds.append(t5_rank_predict(net, bt, words))
        return torch.cat(preds).cpu().numpy()  # .cpu() synchronises

    lams = pick_lambdas(n_sub, st.grid_size)
    predict_all(lams[0])  # warm-up (cuDNN / cuBLAS handles)
    samples, preds = [], []
    for lam in lams:
        t0 = time.perf_counter()
        preds.append(predict_all(lam))
        samples.append(time.perf_counter() - t0)
    per_model = float(np.median(samples))
    for k in st.ks:
        derived = {
            "models_per_s": 1.0 / per_model,
            "seconds_per_model": per_model,
            "total_s_estimate": per_model * k,
            "extrapolated": k > n_sub,
            "timed_models": n_sub,
        }
        rec.add(measurement(f"{name}/K{k}", AREA_GRID, {**cfg, "K": k}, samples, derived=derived))
    if device.type == "cuda":
        net.cpu()
        torch.cuda.empty_cache()
    return np.stack(preds)
