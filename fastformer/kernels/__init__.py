"""Kernels layer: `@triton.jit` code (attention.py, cross_entropy.py) and its host side (launchers,
tile configurations, tuning, the kernel registry). See docs/design.md and docs/kernels.md."""
