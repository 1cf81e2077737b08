"""Benchmarks of spectral_kernels' FourierFT, OFT and FRoD layers against a frozen base linear, peft and
LoRA, and of a training step of a small LLaMA-style model with each.

``python -m bench`` runs both (``--help`` for the options), ``python -m bench.report`` renders its
results as markdown (``--readme`` for README.md), ``pytest bench/ --benchmark-only`` runs the
micro-benchmarks.
"""
