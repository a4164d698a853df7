"""The API on torch tensors against PyTorch's SDPA, 16-bit dtypes, and a kernel as a custom
operator under `torch.compile`."""

import numpy as np
import pytest

import einfuse
from conftest import ATTENTION, path, random

torch = pytest.importorskip("torch")


def sdpa(q, k, v, scale, causal=False):
    return torch.nn.functional.scaled_dot_product_attention(
        q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), is_causal=causal, scale=scale).squeeze(0)


@pytest.mark.parametrize("target", ["cpu", "cpu-llvm"])
@pytest.mark.parametrize("name,causal", [("prefill", False), ("prefill_causal", True)])
def test_benchmark_kernels_agree_with_sdpa(target, name, causal):
    """The PyTorch-layout benchmark kernels (H = 8, d = 64) on ragged sizes, torch in, torch out."""
    kernel = einfuse.compile_file(path("benches", "pytorch.ein"), target).kernel(name)
    q = torch.from_numpy(random((8, 67, 64), 1))
    k = torch.from_numpy(random((8, 67, 64), 2))
    v = torch.from_numpy(random((8, 67, 64), 3))
    got = kernel(Q=q, K=k, V=v)["AV"]
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32 and got.shape == (8, 67, 64)
    torch.testing.assert_close(got, sdpa(q, k, v, 0.125, causal), atol=2e-5, rtol=0)


def test_16_bit_tensors():
    kernel = einfuse.compile(ATTENTION).kernel("attention")
    q, k, v = (torch.from_numpy(random((2, 7, 16), s)) for s in (1, 2, 3))
    for dtype in [torch.float16, torch.bfloat16]:
        got = kernel(Q=q.to(dtype), K=k.to(dtype), V=v.to(dtype))["AV"]
        assert got.dtype == torch.float32  # the kernel's output is declared f32
        want = kernel(Q=q.to(dtype).float(), K=k.to(dtype).float(), V=v.to(dtype).float())["AV"]
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    narrow = einfuse.compile("kernel k {\n rank M\n input A[M]: bf16\n Y[m] = A[m] * 2\n output Y: bf16\n}").kernel()
    y = narrow(A=torch.tensor([1.0, 3.0, 0.1]))["Y"]
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, (torch.tensor([1.0, 3.0, 0.1]).to(torch.bfloat16).float() * 2).to(torch.bfloat16))


def test_tensors_that_need_grad_and_views():
    kernel = einfuse.compile(ATTENTION).kernel("attention")
    q = torch.from_numpy(random((2, 5, 16), 1)).requires_grad_()
    k = torch.from_numpy(random((2, 40, 16), 2))
    v = torch.from_numpy(random((40, 2, 16), 3)).transpose(0, 1)  # a strided view
    got = kernel(Q=q, K=k, V=v)["AV"]
    torch.testing.assert_close(got, sdpa(q.detach(), k, v, 0.25), atol=2e-5, rtol=0)


def test_other_dtypes_are_refused_with_a_clear_message():
    kernel = einfuse.compile(ATTENTION).kernel("attention")
    q = torch.zeros(2, 5, 16, dtype=torch.int64)
    with pytest.raises(einfuse.EinfuseError, match=r"input `Q` has dtype torch.int64"):
        kernel(Q=q, K=q, V=q)


def test_cuda_tensors_are_refused_with_a_clear_message():
    kernel = einfuse.compile(ATTENTION).kernel("attention")
    if not torch.cuda.is_available():
        q = torch.empty(2, 5, 16, device="meta")
        with pytest.raises(einfuse.EinfuseError, match="is on meta"):
            kernel(Q=q, K=q, V=q)
        return
    q = torch.zeros(2, 5, 16, device="cuda")
    with pytest.raises(einfuse.EinfuseError, match="cuda"):
        kernel(Q=q, K=q, V=q)


def test_custom_op_under_torch_compile():
    import einfuse.torch as et

    kernel = einfuse.compile(ATTENTION).kernel("causal")
    op = et.custom_op(kernel, "einfuse_test::causal")

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(16, 16)

        def forward(self, x):
            q = self.proj(x)
            return torch.relu(op(q, x, x)) + 1.0

    torch.manual_seed(0)
    block = Block()
    x = torch.randn(2, 24, 16)
    eager = block(x)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True, dynamic=True)
    with torch.no_grad():
        got = compiled(x)
        torch.testing.assert_close(got, eager.detach(), atol=1e-5, rtol=0)
        # Another length reuses the graph with a symbolic length.
        y = torch.randn(2, 31, 16)
        torch.testing.assert_close(compiled(y), block(y), atol=1e-5, rtol=0)
    with torch.no_grad():
        q = block.proj(x)
        want = sdpa(q, x, x, 0.25, causal=True)
        torch.testing.assert_close(op(q, x, x), want, atol=2e-5, rtol=0)
    torch.library.opcheck(op, (x, x, x), test_utils=("test_schema", "test_faketensor"))


def test_custom_op_with_two_outputs():
    import einfuse.torch as et

    source = "kernel two {\n rank M, N = 3\n input A[M, N]\n S[m] = A[m, n]\n X[m] = max[n](A[m, n])\n output S, X\n}"
    op = et.custom_op(einfuse.compile(source).kernel(), "einfuse_test::two")
    a = torch.randn(5, 3)
    s, x = torch.compile(lambda t: op(t), backend="aot_eager", fullgraph=True)(a)
    torch.testing.assert_close(s, a.sum(1))
    torch.testing.assert_close(x, a.max(1).values)
