"""The Triton launchers are `torch.library.triton_op`s (namespace `fastpeft_triton`), so torch.compile traces into
their kernels (`wrap_triton`) instead of breaking the graph, and the dropout seed reaches the kernels as a tensor.

On CPU: every op is registered with the schema its launcher's annotations give, its fake kernel (the launcher run
on fake tensors) agrees with the real op (run by the kernels' interpreted twins) in shapes, dtypes and strides, and
`torch.library.opcheck` passes its schema, autograd-registration and fake-tensor checks. Only a GPU can run
opcheck's AOT-dispatch check (it compiles the kernel for the device) and torch.compile over the ops: `gpu` tests.
"""
import pytest
import torch

pytest.importorskip("triton")

from fastpeft.kernels import adapter, lora, sparse_delta  # noqa: E402

CPU_OPCHECKS = ("test_schema", "test_autograd_registration", "test_faketensor")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def samples(dtype, device="cpu", p=0.25):
    """(op, args) of every Triton op on small odd-sized inputs of `dtype` (seed and fp32 operands as the ops take
    them)."""
    g = torch.Generator().manual_seed(0)
    t = lambda *shape, dt=dtype: torch.randn(*shape, generator=g).to(device=device, dtype=dt)  # noqa: E731
    m, n, k, r, width = 33, 24, 40, 5, 12
    x, dy, w, a, b, s = t(m, k), t(m, n), t(n, k), t(r, k), t(n, r), t(m, r, dt=torch.float32)
    h, wd, wu, z = t(m, k), t(width, k), t(k, width), t(m, width, dt=torch.float32)
    seed = torch.tensor(1234)
    indices = torch.arange(0, n * k, 7, dtype=torch.int32, device=device)
    ops = torch.ops.fastpeft_triton
    return [
        (ops.lora_shrink, (x, a, p, seed)),
        (ops.lora_forward, (x, w, t(n), s, b, 2.0)),
        (ops.lora_forward_small, (x[:9], w, None, a, b, 2.0, p, seed)),
        (ops.lora_backward_shrink, (dy, b, s, 2.0)),
        (ops.lora_backward_dx, (dy, w, s, a, x, p, seed, True)),
        (ops.adapter_forward, (h, wd, t(width), wu, t(k), None, "gelu", 0.5, p, seed)),
        (ops.adapter_backward_up, (t(m, k), wu, z, "silu", 0.5)),
        (ops.adapter_backward_down, (t(m, k), z, wd, h, p, seed, True, True)),
        (ops.sddmm, (dy, x, indices)),
        (ops.scatter_delta_, (t(n, k), t(indices.numel()), t(indices.numel(), dt=torch.float32), indices)),
    ]


def test_every_launcher_is_a_registered_triton_op():
    launchers = [lora.lora_shrink, lora.lora_forward, lora.lora_forward_small, lora.lora_backward_shrink,
                 lora._lora_backward_dx, adapter.adapter_forward, adapter.adapter_backward_up,
                 adapter._adapter_backward_down, sparse_delta.sddmm, sparse_delta.scatter_delta_]
    names = {op._qualified_op_name.split("::")[1] for op, _ in samples(torch.float32)}
    assert {launcher._name for launcher in launchers} == names
    assert "Tensor seed" in str(torch.ops.fastpeft_triton.lora_shrink.default._schema)  # not an int: no .item()
    assert "Tensor(a0!) weight" in str(torch.ops.fastpeft_triton.scatter_delta_.default._schema)


def test_fake_kernels_agree_with_the_ops():
    """opcheck: the schema holds, no autograd is silently dropped, and each op's fake kernel gives the real op's
    output metadata (the real op run by the interpreter, in bf16 only, to keep it short: the GPU test takes all
    dtypes)."""
    for op, args in samples(torch.bfloat16):
        torch.library.opcheck(op, args, test_utils=CPU_OPCHECKS)


def test_fake_kernels_trace_without_data():
    """Under FakeTensorMode the ops give shapes and dtypes without running a kernel (what torch.compile traces)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        bf16 = lambda *shape: torch.empty(*shape, dtype=torch.bfloat16)  # noqa: E731
        x, a, seed = bf16(4096, 1024), bf16(16, 1024), torch.tensor(3)
        shrink = lora.lora_shrink(x, a, 0.1, seed)
        dx, da = lora.lora_backward_dx(bf16(4096, 512), bf16(512, 1024), shrink, a, x, 0.1, seed, need_dx=False)
    assert shrink.shape == (4096, 16) and shrink.dtype == torch.float32
    assert dx is None and da.shape == (16, 1024) and da.dtype == torch.float32


# ------------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck_on_gpu(dtype):
    """All of opcheck, including the AOT-dispatch check that runs the compiled kernels inside a traced graph."""
    for op, args in samples(dtype, device="cuda"):
        torch.library.opcheck(op, args)


@pytest.mark.gpu
def test_compiled_lora_traces_into_the_kernels_and_draws_a_seed_per_call():
    """torch.compile (inductor, fullgraph) over the Triton backend: no graph break, the kernels appear in the graph
    as Triton kernel calls, results match eager, and a seed drawn inside the graph masks each call anew."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    from fastpeft.ops.lora import lora_linear

    torch.manual_seed(0)
    x = torch.randn(300, 96, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(80, 96, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(8, 96, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(80, 8, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step(fn, seed):
        y = fn(x, w, None, a, b, 2.0, 0.25, True, seed, "triton")
        return (y, *torch.autograd.grad(y.float().square().sum(), (x, a, b)))

    seen = set()

    def record(graph_module, example_inputs):
        seen.update(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
        return make_boxed_func(graph_module.forward)

    torch._dynamo.reset()
    recorded = torch.compile(lora_linear, backend=aot_autograd(fw_compiler=record, bw_compiler=record), fullgraph=True)
    step(recorded, 11)
    assert any("triton_kernel_wrapper" in target for target in seen), sorted(seen)
    torch._dynamo.reset()
    compiled = torch.compile(lora_linear, fullgraph=True)
    for got, want in zip(step(compiled, 11), step(lora_linear, 11)):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    first, second = (compiled(x, w, None, a, b, 2.0, 0.25, True, None, "triton") for _ in range(2))
    assert not torch.equal(first, second)  # a fresh seed per call, drawn in the graph
