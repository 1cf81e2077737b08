"""Benchmarks of spectral_kernels' adapter layers against a frozen base linear, peft and LoRA.

``python -m bench`` runs the sweep, ``python -m bench.report`` renders its results as
markdown, ``pytest bench/ --benchmark-only`` runs the micro-benchmarks.
"""
