"""Eager PyTorch references: the executable spec of every op, the fallback for what the kernels do not
cover, and the tests' oracle (backend "reference" forces them; see docs/ops.md)."""
