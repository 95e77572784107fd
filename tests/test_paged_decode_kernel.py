"""The fused CPU paged-decode kernel against the SDPA gather path of engine.model.attention."""

from __future__ import annotations

import pytest
import torch

from engine.model import attention, paged_decode_cpu
from engine.model.attention import AttentionMetadata

pytestmark = pytest.mark.skipif(not paged_decode_cpu.available(),
                                reason="paged decode kernel not built (no compiler?) or disabled")


def _case(dtype, block_size, group, kvh=3, d=64, lens=(1, 2, 17, 40, 5), num_blocks=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = len(lens)
    h = kvh * group
    q = torch.randn(b, h, d, generator=g).to(dtype)
    kv = torch.randn(2, num_blocks, block_size, kvh, d, generator=g).to(dtype)
    width = max((n + block_size - 1) // block_size for n in lens)
    perm = torch.randperm(num_blocks - 1, generator=g) + 1  # block 0 is the padding block
    tables = torch.zeros(b, width, dtype=torch.long)
    used = 0
    for i, n in enumerate(lens):
        nb = (n + block_size - 1) // block_size
        tables[i, :nb] = perm[used : used + nb]
        used += nb
    ctx = torch.tensor(lens, dtype=torch.long)
    return q, kv, tables, ctx


def _sdpa(q, kv, tables, ctx, group):
    meta = AttentionMetadata(slot_mapping=torch.empty(0), num_decode=q.shape[0],
                             decode_block_tables=tables, decode_context_lens=ctx)
    return attention._decode(q, kv, meta, group)


@pytest.mark.parametrize("block_size", [1, 8, 16])
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_sdpa(monkeypatch, dtype, block_size, group):
    lens = (1, 2, 17, 40, 5, 33)
    q, kv, tables, ctx = _case(dtype, block_size, group, lens=lens)
    out = paged_decode_cpu.paged_decode(q, kv, tables, ctx, q.shape[-1] ** -0.5)
    assert out.dtype == dtype and out.shape == q.shape
    monkeypatch.setenv("KVFERRY_PAGED_KERNEL", "0")
    if dtype == torch.float32:
        ref = _sdpa(q, kv, tables, ctx, group)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    else:
        ref = _sdpa(q.float(), kv.float(), tables, ctx, group)  # fp32 reference
        torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("d", [32, 80, 128, 256])
def test_head_dims(monkeypatch, d):
    q, kv, tables, ctx = _case(torch.float32, 16, 2, kvh=2, d=d, lens=(3, 50, 16))
    out = paged_decode_cpu.paged_decode(q, kv, tables, ctx, d ** -0.5)
    monkeypatch.setenv("KVFERRY_PAGED_KERNEL", "0")
    torch.testing.assert_close(out, _sdpa(q, kv, tables, ctx, 2), atol=1e-5, rtol=1e-5)


def test_decode_dispatch_uses_kernel(monkeypatch):
    q, kv, tables, ctx = _case(torch.float32, 8, 3)
    fused = _sdpa(q, kv, tables, ctx, 3)
    monkeypatch.setenv("KVFERRY_PAGED_KERNEL", "0")
    assert not paged_decode_cpu.available()
    torch.testing.assert_close(fused, _sdpa(q, kv, tables, ctx, 3), atol=1e-5, rtol=1e-5)
