"""float64 runs every op on the reference backend (plain PyTorch, exact): the layers work after `.double()` as
nn.Linear does, and torch.autograd.gradcheck can check them; a kernel backend asked for float64 is an error."""
import pytest
import torch
from torch import nn
from torch.autograd import gradcheck

from fastpeft import LoraLinear
from fastpeft import BottleneckConfig, DiffPruningConfig, inject, project_to_density
from fastpeft.ops.adapter import bottleneck_adapter
from fastpeft.ops.lora import lora_linear
from fastpeft.ops.sparse_delta import sddmm
from tests.model_cases import minilm, minilm_batch, hidden
from tests.model_cases import one_thread  # noqa: F401  (autouse fixture)


def double(*shape):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_lora_linear_passes_gradcheck(dropout):
    inputs = (double(2, 3, 5), double(4, 5), double(4), double(2, 5), double(4, 2))
    assert gradcheck(lambda x, w, b, a, bb: lora_linear(x, w, b, a, bb, 1.5, dropout, seed=7), inputs)


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu"])
def test_bottleneck_adapter_passes_gradcheck(activation):
    inputs = (double(3, 6), double(2, 6), double(2), double(6, 2), double(6), double(3, 6))
    assert gradcheck(lambda h, wd, bd, wu, bu, r: bottleneck_adapter(h, wd, bd, wu, bu, activation, 0.5, r,
                                                                      dropout_p=0.2, seed=3), inputs)


def test_sddmm_in_float64_is_the_exact_gather():
    a, b = torch.randn(7, 4, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64)
    indices = torch.tensor([0, 6, 13, 19])
    got = sddmm(a, b, indices)
    assert got.dtype == torch.float64 and torch.equal(got, (a.t() @ b).flatten()[indices])


@pytest.mark.parametrize("backend", ["ext", "triton"])
def test_a_kernel_backend_asked_for_float64_is_an_error(backend):
    x, w, a, b = (torch.randn(*s, dtype=torch.float64) for s in ((2, 5), (4, 5), (2, 5), (4, 2)))
    with pytest.raises(RuntimeError, match=f"backend '{backend}' .* got float64 .*reference backend"):
        lora_linear(x, w, None, a, b, 1.0, backend=backend)


def test_lora_layer_after_double_matches_the_float64_math():
    layer = LoraLinear.from_linear(nn.Linear(5, 4), r=2).double()
    nn.init.normal_(layer.lora_B["default"])
    x = torch.randn(3, 5, dtype=torch.float64)
    base = layer.base_layer
    expected = base(x) + layer.settings["default"].scaling * x @ layer.lora_A["default"].t() @ layer.lora_B["default"].t()
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("config", [BottleneckConfig(placement="houlsby", bottleneck=8, init="zero-up"),
                                    DiffPruningConfig(target_modules=["query"])], ids=["adapter", "diff"])
def test_injected_double_model_reproduces_the_base(config):
    base = minilm().double()
    expected = hidden(base, minilm_batch())
    model = inject(base, config)
    if isinstance(config, DiffPruningConfig):
        project_to_density(model)  # the fixed-mask layers, whose delta starts at zero
    torch.testing.assert_close(hidden(model, minilm_batch()), expected, rtol=1e-12, atol=1e-12)
