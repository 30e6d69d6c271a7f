"""Run a toy fine-tune in a fresh process (for multi-device, multi-process and kill/resume tests).

python -m tests.toy_train WORKDIR [--steps N] [--method M] [--ckpt-every K]
                          [--coordinator HOST:PORT --num-processes P --process-id I]
"""

import argparse
import os


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("workdir")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--method", default="lora")
    ap.add_argument("--ckpt-every", type=int, default=4)
    ap.add_argument("--coordinator")
    ap.add_argument("--num-processes", type=int, default=1)
    ap.add_argument("--process-id", type=int, default=0)
    a = ap.parse_args()

    import jax

    if a.coordinator:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(a.coordinator, a.num_processes, a.process_id)

    from llora_jax import model as M
    from llora_jax import train as TR
    from llora_jax.adapters import LoraConfig
    from tests import toy

    tm = toy.toy_task_model()
    spec = M.AdapterSpec(a.method, LoraConfig(rank=4, alpha=8.0, targets=("query", "value")))
    oc = TR.OptimConfig(optimizer="adamw", learning_rate=1e-2, weight_decay=0.01)
    lc = TR.LoopConfig(
        total_steps=a.steps,
        batch_size=32,
        seed=0,
        log_every=1,
        ckpt_every=a.ckpt_every,
        progress=False,
    )
    TR.finetune(tm, spec, oc, lc, toy.toy_task(), a.workdir, meta={"task": "toy"})
    print(f"devices={jax.device_count()} processes={jax.process_count()} done", flush=True)
    if a.coordinator:
        jax.distributed.shutdown()
    os._exit(0)  # skip slow interpreter teardown of background threads


if __name__ == "__main__":
    main()
