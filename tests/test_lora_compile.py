"""torch.compile traces the LoRA op (the extension's ops are registered custom ops with meta kernels)."""
import pytest
import torch

from fastpeft.ops.lora import lora_linear


@pytest.mark.parametrize("backend", ["torch", "ext"])
def test_compiled_matches_eager(backend):
    torch.manual_seed(0)
    x = torch.randn(32, 24, requires_grad=True)
    weight, lora_b = torch.randn(16, 24), torch.randn(16, 4, requires_grad=True)
    lora_a = torch.randn(4, 24, requires_grad=True)

    def step(fn):
        y = fn(x, weight, None, lora_a, lora_b, 2.0, 0.25, True, 11, backend)
        grads = torch.autograd.grad(y.square().sum(), (x, lora_a, lora_b))
        return (y, *grads)

    compiled = torch.compile(lora_linear, backend="aot_eager", fullgraph=True)
    for got, want in zip(step(compiled), step(lora_linear)):
        torch.testing.assert_close(got, want)
