"""Patch existing Hugging Face models with fastformer layers."""

from .hf import patch_hf_model

__all__ = ["patch_hf_model"]
