"""Regression tests for fixes from a static review of the CUDA part of the fused optimizer that can be
observed without a GPU. Each failed before its fix."""

import warnings

import pytest
import torch

import fastformer as ff
from fastformer.optim import _ext


@pytest.fixture
def cuda_build_without_code_for_this_gpu(monkeypatch):
    """A CUDA build of the extension (adam_step has a CUDA kernel) whose kernels have no code for the
    GPU: the case of the default sm_80/sm_90 build (with compute_90 PTX) on a T4 (sm_75) or a V100."""
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    monkeypatch.setattr(
        torch._C,
        "_dispatch_has_kernel_for_dispatch_key",
        lambda op, key: True if (op, key) == ("fastformer::adam_step", "CUDA") else has_kernel(op, key),
    )
    probes = []
    monkeypatch.setattr(_ext, "_probe", lambda index: probes.append(index) or index != 0, raising=False)
    monkeypatch.setattr(_ext, "_cuda_runnable", {}, raising=False)
    monkeypatch.setitem(_ext._warned, "done", False)
    return probes


def test_cuda_kernels_without_code_for_the_gpu_take_torchs_path(cuda_build_without_code_for_this_gpu):
    """With kernels registered for CUDA but no code for the GPU, every step raised "no kernel image is
    available" (after counting the steps) instead of taking torch's path; now the device is probed
    once and its parameters (and clip_grad_norm_'s gradients) go to torch's implementation."""
    probes = cuda_build_without_code_for_this_gpu
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not ff.optim.extension_available("cuda:0")
        assert not _ext.supports(torch.device("cuda", 0))  # cached: asked once per device
    assert probes == [0]
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "not built for cuda:0" in msgs[0], msgs
    assert ff.optim.extension_available("cuda:1")  # another GPU with code for it keeps the kernels
    assert probes == [0, 1]
    assert ff.optim.extension_available("cpu")
