"""ff.t5_attention: in-kernel T5 relative-position bias vs a float64 reference built with Hugging Face's
own bucket function; gradients of q, k, v and the bias table; deterministic table gradient."""

import pytest
import torch
import triton
import triton.language as tl
from conftest import assert_close

import fastformer as ff
import fastformer.kernels.attention as KA
from fastformer.ops.attention import capture_dropout_masks
from fastformer.ops.t5_attention import relative_position_buckets
from fastformer.reference.attention import sdpa_reference
from fastformer.reference.t5_attention import relative_position_bucket

T5Attention = pytest.importorskip("transformers.models.t5.modeling_t5").T5Attention


def _hf_reference(
    q,
    k,
    v,
    table,
    *,
    bidirectional,
    num_buckets,
    max_distance,
    attn_mask=None,
    is_causal=False,
    scale=1.0,
    dropout_mask=None,
    dropout_p=0.0,
):
    """float64 reference whose bias comes from HF's static bucket method."""
    Lq, Lk = q.shape[-2], k.shape[-2]
    rel = torch.arange(Lk, device=q.device)[None, :] - torch.arange(Lq, device=q.device)[:, None]
    bucket = T5Attention._relative_position_bucket(
        rel, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    )
    bias = table[bucket].permute(2, 0, 1).unsqueeze(0)
    return sdpa_reference(
        q,
        k,
        v,
        attn_mask=attn_mask,
        is_causal=is_causal,
        scale=scale,
        bias=bias,
        dropout_p=dropout_p,
        dropout_mask=dropout_mask,
    )


def _run(q, k, v, table, **kw):
    leaves = [t.clone().requires_grad_() for t in (q, k, v, table)]
    with ff.use_backend("triton"):
        out = ff.t5_attention(*leaves[:3], leaves[3], **kw)
    return out, leaves


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 20)])
def test_bucket_function_matches_hf(bidirectional, num_buckets, max_distance):
    rel = torch.arange(-700, 700)[:, None] + torch.zeros(1, 3, dtype=torch.long)
    ours = relative_position_bucket(rel, bidirectional, num_buckets, max_distance)
    hf = T5Attention._relative_position_bucket(
        rel, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    )
    assert torch.equal(ours, hf)
    # the kernels' bucket vector over clamped relative positions agrees with HF on every relative
    # position, and its saturated ends really are constant from sat_left / sat_right on
    rp = relative_position_buckets(bidirectional, num_buckets, max_distance, "cpu")
    r = torch.arange(-700, 700)
    ours_k = rp.bucket.long()[r.clamp(-rp.radius, rp.radius) + rp.radius]
    assert torch.equal(ours_k, hf[:, 0])
    assert rp.sat_left >= 0 and rp.sat_right >= 1
    assert bool((ours_k[r <= -rp.sat_left] == rp.bucket_left).all())
    assert bool((ours_k[r >= rp.sat_right] == rp.bucket_right).all())
    # and the runs are maximal (one step closer in, the bucket differs), so far tiles are as many as can be
    if rp.sat_left > 0:
        assert int(ours_k[r == -rp.sat_left + 1]) != rp.bucket_left
    if rp.sat_right > 1:
        assert int(ours_k[r == rp.sat_right - 1]) != rp.bucket_right


@pytest.mark.parametrize("bidirectional,nb,md", [(True, 32, 4), (True, 32, 8), (True, 16, 1), (False, 32, 16)])
def test_invalid_bucket_config_is_a_value_error(bidirectional, nb, md):
    # max_distance at or below the exact range makes HF's formula decrease and leave [0, num_buckets)
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="max_distance"):
        ff.t5_attention(q, q, q, torch.randn(nb, 1), bidirectional=bidirectional, num_buckets=nb, max_distance=md)


@pytest.mark.parametrize(
    "bidirectional,causal,B,H,Lq,Lk,D",
    [
        (True, False, 2, 2, 17, 17, 16),
        (True, False, 1, 2, 130, 130, 80),
        (False, True, 1, 2, 130, 130, 16),
        (True, False, 2, 1, 17, 130, 16),  # cross lengths
        (True, False, 1, 1, 300, 300, 16),  # distances past max_distance
    ],
)
def test_t5_forward_backward(bidirectional, causal, B, H, Lq, Lk, D, device):
    nb, md = 32, 128
    q, k, v = (torch.randn(B, H, L, D, device=device) for L in (Lq, Lk, Lk))
    table = torch.randn(nb, H, device=device)
    out, leaves = _run(q, k, v, table, bidirectional=bidirectional, num_buckets=nb, max_distance=md, is_causal=causal)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v, table)]
    ref = _hf_reference(*ref_leaves, bidirectional=bidirectional, num_buckets=nb, max_distance=md, is_causal=causal)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.double())
    assert_close(out, ref, torch.float32, "out")
    for name, g, rg in zip(("dq", "dk", "dv", "dtable"), grads, ref_grads):
        assert_close(g, rg, torch.float32, name)


@pytest.mark.parametrize(
    "bidirectional,nb,md,causal,Lq,Lk,mask_kind,p",
    [
        (True, 8, 12, False, 130, 130, "klen", 0.0),  # far-left, near and far-right tiles, masked and not
        (True, 4, 3, False, 75, 140, "bool", 0.0),  # a two-bucket-per-side config, general bool mask
        (False, 8, 12, True, 130, 130, None, 0.0),  # decoder: far-left tiles below the diagonal
        (False, 6, 9, False, 96, 70, "float", 0.0),  # unidirectional without causal: far-right = bucket 0
        (True, 8, 12, False, 97, 97, "klen", 0.3),  # dropout through far and near tiles
    ],
)
def test_t5_far_and_near_tiles(bidirectional, nb, md, causal, Lq, Lk, mask_kind, p, device):
    """Small max_distance so that most tiles are 'far' (one constant bias, one dS sum for the table
    gradient) even at these lengths; every kind of tile and range split is compared with HF's bias."""
    torch.manual_seed(0)
    B, H, D = 2, 2, 16
    q = torch.randn(B, H, Lq, D, device=device)
    k, v = (torch.randn(B, H, Lk, D, device=device) for _ in range(2))
    table = torch.randn(nb, H, device=device)
    mask = None
    if mask_kind == "klen":
        mask = (torch.arange(Lk)[None, :] < torch.tensor([Lk, Lk // 3])[:, None]).to(device)[:, None, None, :]
    elif mask_kind == "bool":
        mask = torch.rand(B, 1, Lq, Lk, device=device) > 0.3
    elif mask_kind == "float":
        mask = torch.randn(1, H, Lq, Lk, device=device).requires_grad_()
    leaves = [t.clone().requires_grad_() for t in (q, k, v, table)]
    kw = dict(bidirectional=bidirectional, num_buckets=nb, max_distance=md, is_causal=causal, dropout_p=p)
    with ff.use_backend("triton"), capture_dropout_masks() as masks:
        out = ff.t5_attention(*leaves, attn_mask=mask, **kw)
    dout = torch.randn_like(out)
    wrt = leaves + ([mask] if mask_kind == "float" else [])
    grads = torch.autograd.grad(out, wrt, dout)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v, table)]
    ref_mask = mask.detach().double().requires_grad_() if mask_kind == "float" else mask
    ref = _hf_reference(
        *ref_leaves,
        bidirectional=bidirectional,
        num_buckets=nb,
        max_distance=md,
        attn_mask=ref_mask,
        is_causal=causal,
        dropout_p=p,
        dropout_mask=masks[0] if p else None,
    )
    ref_grads = torch.autograd.grad(ref, ref_leaves + ([ref_mask] if mask_kind == "float" else []), dout.double())
    assert_close(out, ref, torch.float32, "out")
    for name, g, rg in zip(("dq", "dk", "dv", "dtable", "dmask"), grads, ref_grads):
        assert_close(g, rg, torch.float32, name)


def test_t5_padding_and_deterministic_table_grad(device):
    B, H, L, D, nb, md = 2, 2, 77, 16, 16, 40
    q, k, v = (torch.randn(B, H, L, D, device=device) for _ in range(3))
    table = torch.randn(nb, H, device=device)
    mask = (torch.arange(L)[None, :] < torch.tensor([77, 31])[:, None]).to(device)[:, None, None, :]
    dout = torch.randn(B, H, L, D, device=device)
    runs = []
    for _ in range(2):
        out, leaves = _run(q, k, v, table, num_buckets=nb, max_distance=md, attn_mask=mask)
        runs.append(torch.autograd.grad(out, leaves, dout))
    assert torch.equal(runs[0][3], runs[1][3])
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v, table)]
    ref = _hf_reference(*ref_leaves, bidirectional=True, num_buckets=nb, max_distance=md, attn_mask=mask)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.double())
    assert_close(out, ref, torch.float32, "out")
    for name, g, rg in zip(("dq", "dk", "dv", "dtable"), runs[0], ref_grads):
        assert_close(g, rg, torch.float32, name)


def test_t5_rows_at_a_huge_float_mask_value_get_their_gradients(device):
    """Hugging Face's T5 adds finfo(dtype).min for padding: a row with every key at it averages the values
    uniformly, and its gradients (q, k, v, the table) are that average's (see test_attention.py)."""
    B, H, Lq, Lk, D, nb, md = 2, 2, 11, 14, 16, 16, 40
    q, k, v = (torch.randn(B, H, n, D, device=device) for n in (Lq, Lk, Lk))
    table = torch.randn(nb, H, device=device)
    mask = torch.zeros(B, 1, Lq, Lk, device=device)
    mask[0, :, 4] = torch.finfo(torch.float32).min
    mask[1, :, :, 9:] = torch.finfo(torch.float32).min
    dout = torch.randn(B, H, Lq, D, device=device)
    out, leaves = _run(q, k, v, table, num_buckets=nb, max_distance=md, attn_mask=mask)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v, table)]
    ref = _hf_reference(*ref_leaves, bidirectional=True, num_buckets=nb, max_distance=md, attn_mask=mask.double())
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.double())
    assert_close(out, ref, torch.float32, "out")
    for name, g, rg in zip(("dq", "dk", "dv", "dtable"), grads, ref_grads):
        assert_close(g, rg, torch.float32, name)


def test_t5_dropout_and_scale(device):
    B, H, L, D, p = 1, 2, 33, 16, 0.2
    q, k, v = (torch.randn(B, H, L, D, device=device) for _ in range(3))
    table = torch.randn(32, H, device=device)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, table)]
    with ff.use_backend("triton"), capture_dropout_masks() as masks:
        out = ff.t5_attention(*leaves, is_causal=True, bidirectional=False, scale=0.5, dropout_p=p)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v, table)]
    ref = _hf_reference(
        *ref_leaves,
        bidirectional=False,
        num_buckets=32,
        max_distance=128,
        is_causal=True,
        scale=0.5,
        dropout_p=p,
        dropout_mask=masks[0],
    )
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.double())
    assert_close(out, ref, torch.float32, "out")
    for name, g, rg in zip(("dq", "dk", "dv", "dtable"), grads, ref_grads):
        assert_close(g, rg, torch.float32, name)


def test_t5_cpu_auto_reference_matches_hf():
    q, k, v = (torch.randn(2, 2, 9, 16, dtype=torch.float64) for _ in range(3))
    table = torch.randn(32, 2, dtype=torch.float64)
    mask = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    mask[1, ..., 5:] = False
    out = ff.t5_attention(q, k, v, table, attn_mask=mask)
    ref = _hf_reference(q, k, v, table, bidirectional=True, num_buckets=32, max_distance=128, attn_mask=mask)
    assert_close(out, ref, torch.float64)


def test_t5_bad_input():
    q = torch.randn(1, 2, 5, 16)
    with pytest.raises(ValueError, match="bias_table"):
        ff.t5_attention(q, q, q, torch.randn(32, 3))
    with pytest.raises(ValueError, match="bias_table"):
        ff.t5_attention(q, q, q, torch.randn(32))
    with pytest.raises(ValueError, match="num_buckets"):
        ff.t5_attention(q, q, q, torch.randn(2, 2), num_buckets=2)
    with pytest.raises(ValueError, match="k"):
        ff.t5_attention(q, q[:, :1], q, torch.randn(32, 2))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_t5_cuda(dtype):
    B, H, L, D = 2, 12, 1024, 64
    q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=dtype) for _ in range(3))
    table = torch.randn(32, H, device="cuda", dtype=torch.float32)
    mask = (torch.arange(L, device="cuda")[None, :] < torch.tensor([L, 700], device="cuda")[:, None])[:, None, None]
    dout = torch.randn_like(q)
    runs = []
    for _ in range(2):
        out, leaves = _run(q, k, v, table, attn_mask=mask)
        runs.append(torch.autograd.grad(out, leaves, dout))
    for a, b in zip(runs[0], runs[1]):
        assert torch.equal(a, b)
    ref_leaves = [t.float().requires_grad_() for t in (q, k, v, table)]
    ref = _hf_reference(*ref_leaves, bidirectional=True, num_buckets=32, max_distance=128, attn_mask=mask)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.float())
    assert_close(out, ref, dtype, "out", 2.0)
    for name, g, rg in zip(("dq", "dk", "dv", "dtable"), runs[0], ref_grads):
        assert_close(g, rg, dtype, name, 2.0)


@triton.jit
def _tile_kind_probe(OUT, BRD, SATS, RD_MAX, n_m, n_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    im = tl.program_id(0)
    jn = tl.program_id(1)
    c = tl.program_id(2)  # (sat_left, sat_right) case
    sat_l = tl.load(SATS + 2 * c)
    sat_r = tl.load(SATS + 2 * c + 1)
    far, far_left, bias = KA._t5_tile_kind(im * BLOCK_M, jn * BLOCK_N, BRD, sat_l, sat_r, RD_MAX, 0, BLOCK_M, BLOCK_N)
    base = OUT + 3 * ((c * n_m + im) * n_n + jn)
    tl.store(base + 0, far.to(tl.float32))
    tl.store(base + 1, far_left.to(tl.float32))
    tl.store(base + 2, bias)


@pytest.mark.parametrize("BM,BN", [(32, 16), (16, 32)])
def test_tile_kind_is_exact(BM, BN, device):
    """A tile is 'far' (one constant bias, one bucket for its dS) exactly when every j − i in it is
    <= −sat_left (far left: bias at −R) or >= sat_right (far right: bias at +R); checked by brute force
    over every residue of the saturation distances against the tile sizes."""
    R = 5
    brd = torch.tensor([10.0] + [0.0] * (2 * R - 1) + [20.0], device=device)
    n_m, n_n = 4, 4
    cases = [(sl, sr) for sl in range(0, 2 * max(BM, BN) + 3) for sr in (1, sl + 1)]
    sats = torch.tensor(cases, dtype=torch.int32, device=device).flatten()
    out = torch.empty(len(cases) * n_m * n_n * 3, device=device)
    _tile_kind_probe[(n_m, n_n, len(cases))](out, brd, sats, R, n_m, n_n, BLOCK_M=BM, BLOCK_N=BN)
    got = out.view(len(cases), n_m, n_n, 3).cpu()
    # every element's j − i, enumerated: (n_m, n_n, BM, BN)
    rows = torch.arange(n_m)[:, None, None, None] * BM + torch.arange(BM)[None, None, :, None]
    cols = torch.arange(n_n)[None, :, None, None] * BN + torch.arange(BN)[None, None, None, :]
    rel = (cols - rows).flatten(2)
    for c, (sat_l, sat_r) in enumerate(cases):
        left = (rel <= -sat_l).all(-1)
        right = (rel >= sat_r).all(-1)
        assert torch.equal(got[c, :, :, 0].bool(), left | right), (sat_l, sat_r)
        assert torch.equal(got[c, :, :, 1].bool(), left), (sat_l, sat_r)
        expect_bias = torch.where(left, 10.0, 20.0)
        far = left | right
        assert torch.equal(got[c, :, :, 2][far], expect_bias[far]), (sat_l, sat_r)


def test_t5_table_gradient_alone(device):
    """Frozen q, k, v (only the table learns): the dK/dV pass still runs for the table's partials, the
    dQ pass is skipped, and the table gradient is right."""
    q, k, v = (torch.randn(1, 2, 40, 16, device=device) for _ in range(3))
    table = torch.randn(8, 2, device=device, requires_grad=True)
    with ff.use_backend("triton"):
        out = ff.t5_attention(q, k, v, table, num_buckets=8, max_distance=12)
    dout = torch.randn_like(out)
    (g,) = torch.autograd.grad(out, table, dout)
    ref_table = table.detach().double().requires_grad_()
    ref = _hf_reference(
        q.double(), k.double(), v.double(), ref_table, bidirectional=True, num_buckets=8, max_distance=12
    )
    (rg,) = torch.autograd.grad(ref, ref_table, dout.double())
    assert_close(g, rg, torch.float32, "dtable")


@pytest.mark.cuda
@pytest.mark.parametrize("bidirectional,causal,p", [(True, False, 0.0), (False, True, 0.0), (True, False, 0.2)])
def test_t5_cuda_far_and_near_tiles(bidirectional, causal, p):
    """The GPU tile sizes with a small max_distance: most tiles far, several near ones per row block."""
    B, H, L, D, nb, md = 2, 4, 700, 64, 8, 12
    q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    table = torch.randn(nb, H, device="cuda", dtype=torch.float32)
    mask = (torch.arange(L, device="cuda")[None, :] < torch.tensor([L, 333], device="cuda")[:, None])[:, None, None]
    leaves = [t.clone().requires_grad_() for t in (q, k, v, table)]
    kw = dict(bidirectional=bidirectional, num_buckets=nb, max_distance=md, is_causal=causal, dropout_p=p)
    with ff.use_backend("triton"), capture_dropout_masks() as masks:
        out = ff.t5_attention(*leaves, attn_mask=mask, **kw)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [t.float().requires_grad_() for t in (q, k, v, table)]
    ref = _hf_reference(
        *ref_leaves,
        bidirectional=bidirectional,
        num_buckets=nb,
        max_distance=md,
        attn_mask=mask,
        is_causal=causal,
        dropout_p=p,
        dropout_mask=masks[0] if p else None,
    )
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.float())
    assert_close(out, ref, torch.bfloat16, "out", 2.0)
    for name, g, rg in zip(("dq", "dk", "dv", "dtable"), grads, ref_grads):
        assert_close(g, rg, torch.bfloat16, name, 2.0)
