"""The training code's CUDA-only paths: CUDA generators on --resume, device choice under torchrun, the
process group's collective timeout. No GPU here: torch.cuda is stubbed as a machine with N GPUs whose
generators behave as torch's do (an index past the last GPU is an IndexError); the `cuda` tests run
the same paths for real under `make gpu-check`."""

from datetime import timedelta

import pytest
import torch
from train_helpers import tiny_config, tiny_corpus  # noqa: F401 (fixture)

from fastformer.train import distributed as D
from fastformer.train.checkpoint import load_checkpoint, rng_state, set_rng_state


class FakeCuda:
    """torch.cuda's generator functions for a machine with `n` GPUs (generator i's state: a tensor)."""

    def __init__(self, monkeypatch, n: int):
        self.n, self.current = n, 0
        self.gens = {i: torch.tensor([100 + i], dtype=torch.uint8) for i in range(n)}
        for name in ("is_available", "device_count", "get_rng_state", "get_rng_state_all"):
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set_rng_state)
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", self.set_rng_state_all)

    def is_available(self):
        return True

    def device_count(self):
        return self.n

    def _index(self, device):
        if isinstance(device, int):
            return device
        idx = torch.device(device).index
        return self.current if idx is None else idx

    def get_rng_state(self, device="cuda"):
        return self.gens[self._index(device)].clone()

    def get_rng_state_all(self):
        return [self.get_rng_state(i) for i in range(self.n)]

    def set_rng_state(self, state, device="cuda"):
        idx = self._index(device)
        if idx >= self.n:  # torch.cuda.default_generators[idx] past the last GPU
            raise IndexError("tuple index out of range")
        self.gens[idx] = state.clone()

    def set_rng_state_all(self, states):  # as torch's: one set_rng_state per listed device
        for i, s in enumerate(states):
            self.set_rng_state(s, i)


def test_resume_on_a_machine_with_fewer_gpus_restores_the_training_generator(monkeypatch):
    """A run that trained on cuda:1 of a 2-GPU machine resumes on a 1-GPU one (or under
    CUDA_VISIBLE_DEVICES=0): the restore used to index generator 1 there (IndexError at --resume);
    now cuda:0, the device it trains on, continues the saved training device's stream."""
    two = FakeCuda(monkeypatch, 2)
    two.gens[1] = torch.tensor([42], dtype=torch.uint8)  # the training device's generator
    saved = rng_state(torch.device("cuda:1"))
    one = FakeCuda(monkeypatch, 1)
    set_rng_state(saved, torch.device("cuda:0"))
    assert torch.equal(one.gens[0], torch.tensor([42], dtype=torch.uint8))


def test_resume_on_the_same_device_restores_every_generator(monkeypatch):
    fake = FakeCuda(monkeypatch, 2)
    saved = rng_state(torch.device("cuda:1"))
    fake.gens = {0: torch.tensor([1], dtype=torch.uint8), 1: torch.tensor([2], dtype=torch.uint8)}
    set_rng_state(saved, torch.device("cuda:1"))
    assert fake.gens[0].item() == 100 and fake.gens[1].item() == 101


def _torchrun_env(monkeypatch, rank: int, local_world: int = 2, world: int = 2):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank % local_world))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))


def test_process_group_gets_the_collective_timeout(monkeypatch):
    """nccl's default collective timeout is 10 minutes: rank 0 generating text2text predictions alone
    for longer had the waiting ranks killed by the watchdog. The group now gets 60 minutes, or
    FASTFORMER_DIST_TIMEOUT minutes."""
    calls = []
    monkeypatch.setattr(D.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(D.dist, "init_process_group", lambda backend, **kw: calls.append((backend, kw)))
    _torchrun_env(monkeypatch, rank=1)
    monkeypatch.delenv(D.TIMEOUT_ENV, raising=False)
    info, dev = D.init("cpu")
    assert info.rank == 1 and dev.type == "cpu"
    assert calls[-1] == ("gloo", {"timeout": timedelta(minutes=60)})
    monkeypatch.setenv(D.TIMEOUT_ENV, "90")
    D.init("cpu")
    assert calls[-1][1]["timeout"] == timedelta(minutes=90)
    for bad in ("0", "-3", "soon", "nan", "inf", "1e-9"):  # 1e-9 minutes: a zero timedelta
        monkeypatch.setenv(D.TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=D.TIMEOUT_ENV):
            D.init("cpu")


def test_device_choice_on_a_gpu_machine(monkeypatch):
    FakeCuda(monkeypatch, 2)
    assert D.resolve_device("auto") == torch.device("cuda:0")
    assert D.resolve_device("cuda", D.DistInfo(1, 2, 1)) == torch.device("cuda:1")
    assert D.resolve_device("cuda:1") == torch.device("cuda:1")
    # more processes than GPUs: one line, not set_device's "invalid device ordinal" traceback
    with pytest.raises(ValueError, match="LOCAL_RANK 2 has no GPU"):
        D.resolve_device("cuda", D.DistInfo(2, 3, 2))
    with pytest.raises(ValueError, match="has 2 GPU"):
        D.resolve_device("cuda:2")
    with pytest.raises(ValueError, match="cuda:N"):
        D.resolve_device("cuda:x")
    # under torchrun an explicit index would put every local process on one GPU (nccl: "Duplicate GPU")
    _torchrun_env(monkeypatch, rank=1)
    with pytest.raises(ValueError, match="give --device cuda"):
        D.resolve_device("cuda:0", D.DistInfo(1, 2, 1))


@pytest.mark.cuda
def test_cuda_resume_restores_the_training_devices_generator(tmp_path, tiny_corpus):
    """A bf16 run on the GPU stopped after step 2 and resumed to step 4: the checkpoint holds the
    training device's generator, restored onto it; the resumed run ends where an uninterrupted one does."""
    whole = tmp_path / "whole"
    ref = D.resolve_device("cuda")
    from fastformer.train.pretrain import pretrain

    a = pretrain(tiny_config(whole, tiny_corpus, steps=4, device="cuda", eval_every=0))
    part = tmp_path / "part"
    pretrain(tiny_config(part, tiny_corpus, steps=4, device="cuda", stop_at=2, eval_every=0))
    state = load_checkpoint(part / "checkpoint.pt")["rng"]
    assert "cuda_device" in state
    set_rng_state(state, ref)
    assert torch.equal(torch.cuda.get_rng_state(ref), state["cuda_device"])
    b = pretrain(tiny_config(part, tiny_corpus, steps=4, device="cuda", eval_every=0, resume=True))
    assert b["steps"] == 4 and b["resumed_from"] == 2
    assert abs(a["final_loss"] - b["final_loss"]) <= 2e-2 * abs(a["final_loss"])


def test_mfu_peak_matches_whole_names_and_variants_first(monkeypatch):
    """Peaks were matched by substring in table order: an L40 took the L4's peak and an H100 PCIe the
    SXM's. Names now match as whole words, a variant before its family; an unlisted card gets none."""
    from fastformer.train.metrics import peak_flops

    for name, want in (
        ("NVIDIA L40", None),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA GH200 480GB", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("Tesla V100-SXM2-16GB", None),
    ):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        assert peak_flops(torch.device("cuda", 0)) == want, name
