"""torch.compile traces the LoRA and adapter ops whole (the extension's ops are registered custom ops with meta
kernels), including the dropout seed drawn inside the compiled code (a tensor, so no `.item()` splits the graph)."""
import pytest
import torch
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func

from fastpeft import BottleneckAdapter, LoraLinear
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
    got_all, want_all = step(compiled), step(lora_linear)
    assert all(g.count_nonzero() > 0 for g in want_all[1:])  # B != 0: dA and the low-rank part of dx are live
    for got, want in zip(got_all, want_all):
        torch.testing.assert_close(got, want)


def _lora_layer():
    layer = LoraLinear.from_linear(torch.nn.Linear(24, 16), r=4, lora_alpha=8, lora_dropout=0.25)
    torch.nn.init.normal_(layer.lora_B["default"])  # B = 0 would hide the low-rank term and its dropout
    return layer


def _adapter():
    return BottleneckAdapter(24, bottleneck=6, dropout=0.25, init="near-identity")


def _recording_backend(seen: set):
    """aot_eager that also notes the ops of the forward and backward graphs."""
    def record(graph_module, example_inputs):
        seen.update(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
        return make_boxed_func(graph_module.forward)

    return aot_autograd(fw_compiler=record, bw_compiler=record)


@pytest.mark.parametrize("make", [_lora_layer, _adapter], ids=["lora", "adapter"])
@pytest.mark.parametrize("backend", ["torch", "ext"])
def test_compiled_module_draws_a_fresh_seed_per_call(make, backend, monkeypatch):
    """Dropout with no seed given: the draw from torch's generator is part of the graph (one graph with default
    settings, no recompile per seed), so a compiled module follows torch.manual_seed exactly as the eager one and
    masks each call anew."""
    monkeypatch.setenv("FASTPEFT_BACKEND", backend)
    torch.manual_seed(0)
    module, x = make(), torch.randn(3, 10, 24)
    torch._dynamo.reset()  # the other cases' compiled code would count as a recompile here
    assert torch._dynamo.explain(module)(x).graph_break_count == 0  # not even where fullgraph would let it through
    torch._dynamo.reset()
    seen = set()
    compiled = torch.compile(module, backend=_recording_backend(seen), fullgraph=True)

    def run(fn, seed):
        torch.manual_seed(seed)
        first, second = fn(x), fn(x)
        grads = torch.autograd.grad(first.square().sum(), [p for p in module.parameters() if p.requires_grad])
        return first, second, grads

    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in (1, 2):
            got_first, got_second, got_grads = run(compiled, seed)
            want_first, want_second, want_grads = run(module, seed)
            torch.testing.assert_close(got_first, want_first)
            torch.testing.assert_close(got_second, want_second)
            assert all(want.count_nonzero() > 0 for want in want_grads)
            for got, want in zip(got_grads, want_grads):  # fp32 sums may split differently (the compiled graph
                # may ask the extension for dx as well, which changes its chunking): equal up to fp32 rounding
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
            assert not torch.equal(got_first, got_second)  # each call drew its own mask
    assert any(op.startswith("fastpeft.") for op in seen) == (backend == "ext"), seen


@pytest.mark.parametrize("x_needs_grad", [False, True])
@pytest.mark.parametrize("backend", ["torch", "ext"])
def test_inductor_compiles_lora_dropout(backend, x_needs_grad, monkeypatch):
    """The default compiler too, forward and backward: inductor generates C++ for the torch backend's mask hashing
    (a symbolic seed in its integer arithmetic once broke that) and calls the extension's ops as opaque kernels
    (with no dx to write, e.g. a model's first layer, the backward once hit an inductor bug; see lora_da_pass)."""
    monkeypatch.setenv("FASTPEFT_BACKEND", backend)
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer, x = _lora_layer(), torch.randn(3, 10, 24, requires_grad=x_needs_grad)
    inputs = [x] * x_needs_grad + [p for p in layer.parameters() if p.requires_grad]
    compiled = torch.compile(layer, fullgraph=True)
    with torch._inductor.config.patch(fallback_random=True):  # the seed drawn from torch's generator, as in eager
        results = []
        for fn in (compiled, layer):
            torch.manual_seed(1)
            y = fn(x)
            results.append((y, *torch.autograd.grad(y.square().sum(), inputs)))
    assert all(g.count_nonzero() > 0 for g in results[1][1:])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
