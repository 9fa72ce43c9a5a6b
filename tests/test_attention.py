"""Attention weights keep EDM's memory footprint in fp16 and still work under torch.func."""

import numpy as np
import pytest
import torch

from conftest import make_tiny_net
from training import networks

#----------------------------------------------------------------------------

def plain_attention(q, k):
    """The same weights through ordinary ops (what autograd would otherwise record)."""
    wide = torch.promote_types(q.dtype, torch.float32)
    logits = torch.einsum("ncq,nck->nqk", q.to(wide), (k / np.sqrt(k.shape[1])).to(wide))
    return logits.softmax(dim=2).to(q.dtype)

def random_qk(dtype, heads=6, channels=12, pixels=16, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn([heads, channels, pixels], generator=g).to(dtype).requires_grad_(requires_grad) for _ in range(2))
    return q, k

def saved_bytes(fn, *args):
    """Bytes of the distinct storages autograd saves while running fn(*args), and the result.

    A storage saved by several ops or viewed by several saved tensors counts once, as in memory.
    """
    storages = {}
    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn(*args)
    return sum(storages.values()), out

#----------------------------------------------------------------------------

@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16, torch.float32])
def test_attention_saves_only_q_k_and_the_weights_in_their_own_dtype(dtype):
    q, k = random_qk(dtype)
    ours, w = saved_bytes(networks.attention_weights, q, k)
    # The bound is what NVIDIA EDM's AttentionOp saves: q, k and W, in the activation dtype.
    bound = q.numel() * q.element_size() + k.numel() * k.element_size() + w.numel() * w.element_size()
    assert w.dtype == dtype
    assert ours == bound
    plain, _ = saved_bytes(plain_attention, q, k)
    assert plain == 4 * (q.numel() + k.numel() + w.numel()) # Float32 q, k / sqrt(C) and softmax, whatever the dtype.

def test_in_fp16_a_block_saves_less_than_with_plain_autograd():
    torch.manual_seed(0)
    block = networks.UNetBlock(in_channels=16, out_channels=16, emb_channels=8, attention=True, num_heads=2).train()
    x, emb = torch.randn(2, 16, 8, 8).to(torch.float16), torch.randn(2, 8).to(torch.float16)
    block = block.to(torch.float16)
    ours, out = saved_bytes(block, x, emb)
    networks_attention = networks.attention_weights
    try:
        networks.attention_weights = plain_attention
        plain, out_plain = saved_bytes(block, x, emb)
    finally:
        networks.attention_weights = networks_attention
    # Ours keeps views of tensors the block saves anyway (q, k in the qkv output that the second
    # einsum keeps for v; W, which it keeps too): plain autograd adds float32 q, k and softmax.
    heads, channels, pixels = 2 * 2, 8, 64 # Batch times heads, channels per head, pixels.
    assert plain - ours == 4 * (2 * heads * channels * pixels + heads * pixels * pixels)
    assert torch.equal(out, out_plain)

@pytest.mark.parametrize('dtype', [torch.float16, torch.float32])
def test_weights_are_bitwise_those_of_plain_ops(dtype):
    q, k = random_qk(dtype, requires_grad=False)
    assert torch.equal(networks.attention_weights(q, k), plain_attention(q, k))

def test_gradients_and_forward_derivatives_pass_gradcheck_in_float64():
    q, k = random_qk(torch.float64, heads=2, channels=3, pixels=5)
    # gradcheck's batched checks run on the legacy vmap, which has no einsum rule (for plain
    # einsum either); torch.func's vmap over vjp and jvp is checked in the next test instead.
    assert torch.autograd.gradcheck(networks.AttentionWeights.apply, (q, k), check_forward_ad=True)

@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
def test_gradients_agree_with_plain_autograd(dtype):
    q, k = random_qk(dtype)
    cotangent = torch.randn([6, 16, 16]).to(dtype)
    ours = torch.autograd.grad(networks.attention_weights(q, k), (q, k), cotangent)
    plain = torch.autograd.grad(plain_attention(q, k), (q, k), cotangent)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
    for a, b in zip(ours, plain):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b, **tol)

def test_torch_func_jacrev_jvp_and_vmap_work_and_agree_with_autograd():
    q, k = random_qk(torch.float64, heads=2, channels=3, pixels=4, requires_grad=False)
    jac_q, jac_k = torch.func.jacrev(networks.attention_weights, argnums=(0, 1))(q, k)
    ref_q, ref_k = torch.autograd.functional.jacobian(plain_attention, (q, k))
    torch.testing.assert_close(jac_q, ref_q)
    torch.testing.assert_close(jac_k, ref_k)

    tq, tk = torch.randn_like(q), torch.randn_like(k)
    _, tangent = torch.func.jvp(networks.attention_weights, (q, k), (tq, tk))
    _, ref_tangent = torch.func.jvp(plain_attention, (q, k), (tq, tk))
    torch.testing.assert_close(tangent, ref_tangent)
    tangents = torch.stack([tq, 2 * tq, -tq])
    batched_tangent = torch.func.vmap(lambda t: torch.func.jvp(networks.attention_weights, (q, k), (t, tk))[1])(tangents)
    for i in range(3):
        torch.testing.assert_close(batched_tangent[i], torch.func.jvp(plain_attention, (q, k), (tangents[i], tk))[1])

    batched = torch.func.vmap(networks.attention_weights)(q[None].expand(3, -1, -1, -1) * torch.arange(1, 4.)[:, None, None, None].double(), k[None].expand(3, -1, -1, -1))
    for i in range(3):
        torch.testing.assert_close(batched[i], networks.attention_weights(q * (i + 1), k))

def test_a_network_with_attention_has_a_torch_func_jacobian():
    net = make_tiny_net(resolution=8, channels=1)
    assert any(getattr(m, 'num_heads', 0) for m in net.modules()) # TINY_SONG attends at 4x4.
    x, sigma = torch.randn(1, 1, 8, 8), torch.tensor([1.0])
    jac = torch.func.jacrev(lambda v: net(v, sigma))(x)
    ref = torch.autograd.functional.jacobian(lambda v: net(v, sigma), x)
    assert jac.shape == (1, 1, 8, 8, 1, 1, 8, 8)
    torch.testing.assert_close(jac, ref)

#----------------------------------------------------------------------------
