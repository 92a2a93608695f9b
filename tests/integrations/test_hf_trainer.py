"""ff.optim.FusedAdamW inside Hugging Face's `Trainer` (the `hf` extra: transformers + accelerate).

A tiny patched BertForMaskedLM is trained for a few steps by `Trainer` twice from the same weights and
batches: once with FusedAdamW, once with torch's AdamW, each passed either as an instance
(`optimizers=(opt, None)`) or as a class (`optimizer_cls_and_kwargs`, the Trainer builds it with its
weight-decay groups). The weights must end equal within the fp32 tolerance (FusedAdamW follows AdamW
step for step), and must have moved.
"""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers' Trainer refuses to start without it

from conftest import TOLERANCES, rel_err  # noqa: E402

import fastformer as ff  # noqa: E402

VOCAB, L, STEPS = 61, 11, 3
HYPER = dict(lr=3e-3, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.01)


def _train(model, optimizer_cls, form, dataset, out_dir):
    args = transformers.TrainingArguments(
        output_dir=str(out_dir),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        weight_decay=HYPER["weight_decay"],
    )
    if form == "instance":
        how = dict(optimizers=(optimizer_cls(model.parameters(), **HYPER), None))
    else:
        how = dict(optimizer_cls_and_kwargs=(optimizer_cls, HYPER))
    transformers.Trainer(model=model, args=args, train_dataset=dataset, **how).train()
    return model


@pytest.mark.parametrize("form", ["instance", "class"])
def test_trainer_with_fused_adamw_matches_torch_adamw(tmp_path, form):
    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=40,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    start = ff.integrations.patch_hf_model(transformers.BertForMaskedLM(cfg))
    gen = torch.Generator().manual_seed(1)
    dataset = []
    for _ in range(4 * STEPS):
        ids = torch.randint(5, VOCAB, (L,), generator=gen)
        labels = torch.where(torch.rand(L, generator=gen) < 0.3, ids, torch.full_like(ids, -100))
        labels[0] = ids[0]  # every example has a labelled token
        dataset.append({"input_ids": ids, "attention_mask": torch.ones(L, dtype=torch.long), "labels": labels})

    fused = _train(copy.deepcopy(start), ff.optim.FusedAdamW, form, dataset, tmp_path / "fused")
    eager = _train(copy.deepcopy(start), torch.optim.AdamW, form, dataset, tmp_path / "torch")

    checked = 0
    for (name, p), q, p0 in zip(fused.named_parameters(), eager.parameters(), start.parameters()):
        if name.endswith("attention.self.key.bias"):
            # Its gradient is zero in exact arithmetic (softmax ignores a shift of a whole score row):
            # Adam turns the rounding noise into tiny steps that differ between any two optimizers.
            assert p.abs().max() < 1e-4 and q.abs().max() < 1e-4, name
            continue
        assert not torch.equal(p, p0), f"{name} was not updated by the Trainer"
        err = rel_err(p, q)
        assert err <= TOLERANCES[torch.float32], f"{name}: relative error {err:.3e} against torch AdamW"
        checked += 1
    assert checked >= 30
