"""The hand-written backwards (RMSNorm, RoPE, SwiGLU) against torch.autograd.gradcheck in
float64, and their forwards against the same operations composed in torch, in fp32 and bf16."""
import pytest
import torch
import torch.nn.functional as F

from llama.attention import _Rotary, rope_tables
from llama.model import _SwiGLU
from parallel.norm import _RMSNormFunction


def _meta_rms_norm(x, weight, eps):
    """Meta's RMSNorm: normalise in fp32, cast back, scale in the activation dtype."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def _pairwise_rope(x, theta=10000.0):
    """The rotation written out pair by pair, as Meta's complex product computes it: pair i of
    position p turns by p·theta^(-2i/head_dim)."""
    seq, head_dim = x.shape[1], x.shape[-1]
    freqs = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(seq, dtype=torch.float64)[:, None] * freqs
    c, s = angles.cos()[:, None, :].float(), angles.sin()[:, None, :].float()
    x0, x1 = x.float()[..., 0::2], x.float()[..., 1::2]
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)


def test_backwards_pass_gradcheck_in_float64():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: _RMSNormFunction.apply(x, w, 1e-6), (x, w))
    q = torch.randn(2, 5, 3, 8, dtype=torch.float64, requires_grad=True)
    cos, sin = (t.double() for t in rope_tables(8, 5, 10000.0))
    assert torch.autograd.gradcheck(lambda q: _Rotary.apply(q, cos, sin), (q,))
    a, b = (torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(_SwiGLU.apply, (a, b))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_forwards_and_gradients_equal_composed_ops(dtype, tol):
    torch.manual_seed(0)

    def both(fn, ref, *inputs):
        ins = [t.to(dtype).requires_grad_() for t in inputs]
        ref_ins = [t.to(dtype).requires_grad_() for t in inputs]
        out, ref_out = fn(*ins), ref(*ref_ins)
        assert out.dtype == dtype
        assert torch.allclose(out.float(), ref_out.float(), rtol=tol, atol=tol)
        grad = torch.randn_like(out)
        out.backward(grad)
        ref_out.backward(grad.to(ref_out.dtype))
        for i, r in zip(ins, ref_ins):
            scale = max(1.0, r.grad.float().abs().max().item())
            assert torch.allclose(i.grad.float(), r.grad.float(), rtol=tol, atol=tol * scale)

    x, w = torch.randn(4, 16, 64) * 3, torch.rand(64) + 0.5
    both(lambda x, w: _RMSNormFunction.apply(x, w, 1e-5), lambda x, w: _meta_rms_norm(x, w, 1e-5), x, w)
    cos, sin = rope_tables(64, 16, 10000.0)
    q = torch.randn(4, 16, 2, 64)
    both(lambda q: _Rotary.apply(q, cos, sin), lambda q: _pairwise_rope(q).to(dtype), q)
    both(_SwiGLU.apply, lambda a, b: F.silu(a) * b, torch.randn(4, 16, 96), torch.randn(4, 16, 96))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_feed_forward_reusing_w2s_gradient_equals_composed_ops(dtype, tol):
    """FeedForward lets SwiGLU's backward write grad_a over w2's input gradient: the result must
    be autograd's on w2(silu(w1 x) · w3 x)."""
    from llama.model import FeedForward
    torch.manual_seed(0)
    from parallel.params import init_parameters
    ffn = FeedForward(32, 48, n_layers=2, dtype=dtype)
    init_parameters(ffn, 0)
    x = torch.randn(2, 5, 32, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    w1, w2, w3 = (ffn.get_submodule(n).weight.detach().clone().requires_grad_() for n in ("w1", "w2", "w3"))
    grad = torch.randn(2, 5, 32, dtype=dtype)
    ffn(x).backward(grad)
    F.linear(F.silu(F.linear(x_ref, w1)) * F.linear(x_ref, w3), w2).backward(grad)
    for got, want in ((x.grad, x_ref.grad), (ffn.w1.weight.grad, w1.grad), (ffn.w2.weight.grad, w2.grad),
                      (ffn.w3.weight.grad, w3.grad)):
        assert torch.allclose(got.float(), want.float(), rtol=tol, atol=tol * max(1.0, want.abs().max().item()))
