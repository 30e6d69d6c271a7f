"""Adapters in and out: PEFT LoRA adapters, FusionBench L-LoRA files, HF checkpoints."""
