"""Fused optimizers over the compiled extension."""
