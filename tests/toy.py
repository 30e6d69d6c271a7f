"""A tiny attention-like Linen model with HF-style names, for adapter tests."""

import flax.linen as nn
import jax
import jax.numpy as jnp


class ToyBlock(nn.Module):
    dim: int

    @nn.compact
    def __call__(self, x):
        q = nn.Dense(self.dim, name="query")(x)
        k = nn.Dense(self.dim, name="key")(x)
        v = nn.Dense(self.dim, name="value")(x)
        att = jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2) / jnp.sqrt(self.dim), axis=-1)
        h = x + nn.Dense(self.dim, name="output")(att @ v)
        return h + nn.Dense(self.dim, name="ffn")(jnp.tanh(h))


class ToyModel(nn.Module):
    dim: int = 8
    layers: int = 2
    classes: int = 3

    @nn.compact
    def __call__(self, x):
        for i in range(self.layers):
            x = ToyBlock(self.dim, name=f"layer_{i}")(x)
        return nn.Dense(self.classes, name="head")(x.mean(axis=-2))


def make(seed=0, dim=8, layers=2, batch=4, seq=5):
    model = ToyModel(dim=dim, layers=layers)
    x = jax.random.normal(jax.random.key(seed + 100), (batch, seq, dim))
    params = model.init(jax.random.key(seed), x)["params"]
    return model, params, x


def toy_task(seed=0, n=256, seq=4, dim=8, classes=3):
    """A learnable synthetic classification task: the label is the argmax of a fixed projection."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, seq, dim)).astype(np.float32)
    w = rng.normal(size=(dim, classes))
    y = np.argmax(x.mean(1) @ w, axis=-1).astype(np.int32)
    return {"x": x, "label": y}


def toy_task_model(seed=0, dim=8, layers=2):
    from llora_jax import model as M

    module = ToyModel(dim=dim, layers=layers)
    params = module.init(jax.random.key(seed), jnp.zeros((1, 4, dim)))["params"]

    def readout(call, batch, head, train):
        return {"logits": call(batch["x"])}

    return M.TaskModel(
        module=module,
        params=params,
        readout=readout,
        loss=M.classification_loss,
        predict=M.argmax_predict,
        base_model="toy",
    )
