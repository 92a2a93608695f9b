"""Patch existing Hugging Face models with fastformer layers."""
