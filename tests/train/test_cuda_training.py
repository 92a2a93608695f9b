"""GPU checks (run by `make gpu-check`): unpadded varlen layout vs padded mask layout under bf16
autocast, and a short bf16 pre-training run with MFU in metrics.jsonl."""

import pytest
import torch
from train_helpers import tiny_config, tiny_corpus  # noqa: F401 (fixture)

from fastformer.models.bert import BertConfig, BertForMaskedLM
from fastformer.train.metrics import read_metrics
from fastformer.train.pretrain import pretrain


@pytest.mark.cuda
def test_cuda_unpadded_matches_padded_bf16():
    torch.manual_seed(0)
    cfg = dict(
        vocab_size=1003,
        hidden_size=128,
        num_layers=2,
        num_heads=2,
        intermediate_size=256,
        dropout=0.0,
        attention_dropout=0.0,
    )
    a = BertForMaskedLM(BertConfig(**cfg, unpad=False)).cuda()
    b = BertForMaskedLM(BertConfig(**cfg, unpad=True)).cuda()
    b.load_state_dict(a.state_dict())
    B, L = 4, 77
    ids = torch.randint(5, 1003, (B, L), device="cuda")
    mask = torch.arange(L, device="cuda")[None] < torch.tensor([77, 50, 13, 64], device="cuda")[:, None]
    labels = torch.where((torch.rand(B, L, device="cuda") < 0.3) & mask, ids, torch.full_like(ids, -100))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        la, na, _, _ = a(ids, mask, labels)
        lb, nb, _, _ = b(ids, mask, labels)
    assert na == nb
    assert abs(la.item() - lb.item()) / abs(la.item()) < 3e-2
    la.backward()
    lb.backward()
    ga, gb = a.encoder.word_embeddings.weight.grad, b.encoder.word_embeddings.weight.grad
    assert torch.isfinite(gb).all() and (ga - gb).norm() / ga.norm() < 5e-2


@pytest.mark.cuda
def test_cuda_pretrain_bf16_logs_mfu(tmp_path, tiny_corpus):
    out = tmp_path / "gpu"
    s = pretrain(tiny_config(out, tiny_corpus, steps=6, device="cuda", eval_every=3))
    rows = read_metrics(out / "metrics.jsonl")
    assert s["device"].startswith("cuda") and len(rows) == 6
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    if any(k in torch.cuda.get_device_name() for k in ("H100", "H200", "A100")):
        assert all(r.get("mfu", 0) > 0 for r in rows)
