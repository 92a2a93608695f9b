"""Backend dispatch: env var values, code switch, context manager, validation."""
import pytest
import torch

import fastformer as ff
from fastformer.backend import use_triton


def test_default_backend_is_auto_or_env():
    assert ff.get_backend() in ("auto", "triton", "reference")


def test_set_and_context_manager_restore():
    before = ff.get_backend()
    with ff.use_backend("reference"):
        assert ff.get_backend() == "reference"
        assert not use_triton(torch.zeros(1))
        with ff.use_backend("triton"):
            assert ff.get_backend() == "triton"
        assert ff.get_backend() == "reference"
    assert ff.get_backend() == before


def test_auto_uses_reference_for_cpu_tensors():
    with ff.use_backend("auto"):
        assert not use_triton(torch.zeros(1))


def test_triton_forced_on_cpu_runs_interpreter():
    # conftest switches the interpreter on when there is no GPU
    with ff.use_backend("triton"):
        assert use_triton(torch.zeros(1))


def test_unknown_backend_is_value_error():
    with pytest.raises(ValueError, match="backend"):
        ff.set_backend("cuda-magic")


def test_cli_info_runs(capsys):
    from fastformer.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "backend" in out
