"""Every candidate kernel variant passes the attention tests: the modules below run with the default
variants (pointer-load forward, five-GEMM backward); here the same tests run again with the other
ones pinned (`attention_launch.use_variants`): the tensor-descriptor (TMA) forward with its warp-
specialised loop, and the seven-GEMM backward (dK/dV pass + query-stationary dQ pass). The forward
and backward variants are independent, so one extra run covers both. In the Triton interpreter the
descriptor loads are emulated; the warp specialisation is a compile-time transformation the
interpreter does not see (the kernel report checks it)."""

import pytest
import test_attention as A
import test_t5_attention_kernel as T5
import test_t5_attention_offset as OFF
import test_varlen_attention as VL

from fastformer.kernels import attention_launch as AL


@pytest.fixture(autouse=True)
def _other_variants():
    with AL.use_variants(fwd="tma", bwd="7gemm"):
        yield


# dense: shapes, lengths, head-dim padding, fp16, GQA, key padding, masks, dropout
test_dense_fp32 = A.test_dense_fp32
test_fp16_and_scale = A.test_fp16_and_scale
test_gqa = A.test_gqa
test_key_padding_fast_path_and_empty_rows = A.test_key_padding_fast_path_and_empty_rows
test_general_bool_mask_broadcast = A.test_general_bool_mask_broadcast
test_float_mask_with_grad = A.test_float_mask_with_grad
test_kernel_writes_every_output_element = A.test_kernel_writes_every_output_element
test_dropout = A.test_dropout
test_unbatched_3d_inputs = A.test_unbatched_3d_inputs
test_backward_computes_only_the_needed_gradients = A.test_backward_computes_only_the_needed_gradients
test_backward_is_bitwise_reproducible = A.test_backward_is_bitwise_reproducible
# varlen
test_varlen_matches_per_sequence = VL.test_varlen_matches_per_sequence
test_varlen_dropout_replayed = VL.test_varlen_dropout_replayed
# T5: far and near tiles, padding, table gradient, dropout, decoding offsets
test_t5_forward_backward = T5.test_t5_forward_backward
test_t5_far_and_near_tiles = T5.test_t5_far_and_near_tiles
test_t5_padding_and_deterministic_table_grad = T5.test_t5_padding_and_deterministic_table_grad
test_t5_dropout_and_scale = T5.test_t5_dropout_and_scale
test_t5_table_gradient_alone = T5.test_t5_table_gradient_alone
test_offset_matches_rows_of_the_full_call = OFF.test_offset_matches_rows_of_the_full_call
test_offset_through_the_kernels = OFF.test_offset_through_the_kernels


def test_the_pinned_variants_run(monkeypatch):
    """The pins reach the launches: the forward builds with TMA, the backward as dK/dV + dQ passes."""
    import torch

    import fastformer as ff

    seen = []
    real = AL.launch
    monkeypatch.setattr(AL, "launch", lambda item: (seen.append((item.name, item.kwargs.get("TMA"))), real(item))[1])
    q = torch.randn(1, 2, 40, 16, requires_grad=True)
    with ff.use_backend("triton"):
        ff.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
    assert ("attention.fwd", True) in seen
    names = [n for n, _ in seen]
    assert "attention.dkdv" in names and "attention.dq" in names and "attention.bwd" not in names
