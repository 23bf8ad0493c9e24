"""LoraLinear: wrapping without copies, PEFT's init, Conv1D, merge / unmerge (bit-exact), errors."""
import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from fastpeft import LoraLinear


def trained(layer: LoraLinear) -> LoraLinear:
    """Give the adapter nonzero B, as after some training steps."""
    with torch.no_grad():
        layer.lora_B["default"].normal_(0, 0.05)
    return layer


def test_wraps_without_copying_and_freezes_the_base():
    linear = nn.Linear(12, 7)
    layer = LoraLinear.from_linear(linear, r=4, lora_alpha=8)
    assert layer.base_layer.weight.data_ptr() == linear.weight.data_ptr()
    assert not linear.weight.requires_grad and not linear.bias.requires_grad
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A.default", "lora_B.default"]
    assert layer.lora_A["default"].shape == (4, 12) and layer.lora_B["default"].shape == (7, 4)
    assert layer.settings["default"].scaling == 2.0


def test_rslora_scaling():
    layer = LoraLinear.from_linear(nn.Linear(4, 4), r=16, lora_alpha=8, use_rslora=True)
    assert layer.settings["default"].scaling == pytest.approx(8 / math.sqrt(16))


@pytest.mark.parametrize("init", ["default", "gaussian"])
def test_peft_init_starts_as_the_base_layer(init):
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    layer = LoraLinear.from_linear(linear, r=8, init=init)
    a = layer.lora_A["default"]
    assert torch.count_nonzero(layer.lora_B["default"]) == 0
    if init == "default":  # kaiming_uniform(a=sqrt(5)): bound = 1/sqrt(fan_in)
        assert a.abs().max() <= 1 / math.sqrt(64) and a.std() > 0.5 / math.sqrt(3 * 64)
    else:
        assert abs(a.std().item() - 1 / 8) < 0.02
    x = torch.randn(5, 64)
    torch.testing.assert_close(layer(x), linear(x))


def test_conv1d_matches_linear_math():
    torch.manual_seed(0)
    conv = Conv1D(6, 10)  # nf=out=6, nx=in=10, weight [10, 6]
    nn.init.normal_(conv.weight)
    layer = trained(LoraLinear.from_linear(conv, r=3, lora_alpha=6))
    assert (layer.in_features, layer.out_features) == (10, 6)
    x = torch.randn(2, 5, 10)
    expected = conv(x) + 2.0 * x @ layer.lora_A["default"].T @ layer.lora_B["default"].T
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("make", [lambda: nn.Linear(16, 8), lambda: Conv1D(8, 16)])
def test_merge_equals_plain_base_and_unmerge_restores_bits(make):
    torch.manual_seed(0)
    base = make()
    layer = trained(LoraLinear.from_linear(base, r=4)).eval()
    x = torch.randn(3, 16)
    unmerged_out = layer(x)
    original = base.weight.clone()
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(base(x), layer(x), rtol=0, atol=0)  # merged forward is the plain base layer
    torch.testing.assert_close(layer(x), unmerged_out)
    layer.unmerge()
    assert torch.equal(base.weight, original)
    torch.testing.assert_close(layer(x), unmerged_out, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hundred_merge_unmerge_cycles_are_bit_exact(dtype):
    torch.manual_seed(0)
    base = nn.Linear(32, 24).to(dtype)
    layer = trained(LoraLinear.from_linear(base, r=8))
    original = base.weight.clone()
    for _ in range(100):
        layer.merge()
        assert not torch.equal(base.weight, original)  # the delta is not below the weight's precision
        layer.unmerge()
    assert torch.equal(base.weight, original)


def test_merge_twice_and_unmerge_unmerged_are_errors():
    layer = LoraLinear.from_linear(nn.Linear(4, 4), r=2)
    with pytest.raises(ValueError, match="unmerge"):
        layer.unmerge()
    layer.merge()
    with pytest.raises(ValueError, match="already merged"):
        layer.merge()


def test_disabled_adapter_runs_the_base_even_when_merged():
    torch.manual_seed(0)
    base = nn.Linear(8, 8)
    layer = trained(LoraLinear.from_linear(base, r=2))
    x = torch.randn(4, 8)
    plain = base(x)
    layer.merge()
    layer.disabled = True
    torch.testing.assert_close(layer(x), plain, rtol=0, atol=0)


def test_named_adapters_switch_and_delete():
    torch.manual_seed(0)
    layer = trained(LoraLinear.from_linear(nn.Linear(8, 8), r=2))
    layer.add_adapter("second", r=3)
    assert layer.active_adapter == "second"
    x = torch.randn(2, 8)
    torch.testing.assert_close(layer(x), layer.base_layer(x))  # fresh adapter: B = 0
    layer.set_adapter("default")
    assert not torch.allclose(layer(x), layer.base_layer(x))
    layer.delete_adapter("default")
    assert layer.active_adapter == "second" and "default" not in layer.lora_A
    with pytest.raises(ValueError, match="unknown adapter 'default'"):
        layer.set_adapter("default")


def test_extra_repr_shows_the_settings():
    layer = LoraLinear.from_linear(nn.Linear(4, 4), r=2, lora_alpha=4, lora_dropout=0.1)
    for part in ("adapter='default'", "r=2", "alpha=4", "dropout=0.1", "merged=False", "backend="):
        assert part in repr(layer)
    layer.add_adapter("other", r=3)
    layer.set_adapter("default")
    layer.merge("other")  # the merged adapter is named, also when it is not the active one
    assert "adapter='default'" in repr(layer) and "merged='other'" in repr(layer)


def test_weight_and_bias_read_through_to_the_base_layer_as_in_peft():
    """transformers reads e.g. `model.get_output_embeddings().weight`."""
    linear, conv = nn.Linear(4, 3), Conv1D(3, 4)
    for base in (linear, conv, nn.Linear(4, 3, bias=False)):
        layer = LoraLinear.from_linear(base, r=2)
        assert layer.weight is base.weight and layer.bias is base.bias
        assert "weight" not in dict(layer.named_parameters())  # not a second parameter


def test_dropout_is_active_in_train_mode_only():
    torch.manual_seed(0)
    layer = trained(LoraLinear.from_linear(nn.Linear(16, 16), r=4, lora_dropout=0.5))
    x = torch.randn(8, 16)
    layer.train()
    assert not torch.equal(layer(x), layer(x))  # a fresh mask per call
    layer.eval()
    assert torch.equal(layer(x), layer(x))


@pytest.mark.parametrize("kwargs, message", [
    (dict(r=0), "r \\(a LoRA rank\\) must be an int >= 1, got 0"),
    (dict(r=2.5), "r \\(a LoRA rank\\) must be an int >= 1, got 2.5"),
    (dict(lora_dropout=1.0), "lora_dropout must be a float in \\[0, 1\\)"),
    (dict(lora_dropout=-0.1), "lora_dropout"),
    (dict(init="xavier"), "init must be one of"),
    (dict(lora_alpha=float("nan")), "lora_alpha must be a finite non-zero number, got nan"),
])
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraLinear.from_linear(nn.Linear(4, 4), **kwargs)


def test_non_linear_base_is_rejected():
    with pytest.raises(TypeError, match="nn.Linear or transformers' Conv1D, got Conv2d"):
        LoraLinear.from_linear(nn.Conv2d(3, 3, 1))


def test_float32_master_weights_on_a_bfloat16_layer():
    """The adapter's weights stay fp32 (PEFT's autocast_adapter_dtype) and are cast to bf16 for each forward."""
    torch.manual_seed(0)
    base = nn.Linear(8, 6).to(torch.bfloat16)
    layer = LoraLinear.from_linear(base, r=2, dtype=torch.float32)
    nn.init.normal_(layer.lora_B["default"])
    assert {layer.lora_A["default"].dtype, layer.lora_B["default"].dtype} == {torch.float32}
    rounded = LoraLinear.from_linear(nn.Linear(8, 6).to(torch.bfloat16), r=2)
    with torch.no_grad():
        rounded.base_layer.load_state_dict(base.state_dict())
        rounded.lora_A["default"].copy_(layer.lora_A["default"])
        rounded.lora_B["default"].copy_(layer.lora_B["default"])
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16 and torch.equal(out, rounded(x))
    out.float().sum().backward()
    assert layer.lora_A["default"].grad.dtype == torch.float32 and layer.lora_B["default"].grad.abs().sum() > 0
    with pytest.raises(ValueError, match="dtype must be a floating point torch.dtype or None, got 'float32'"):
        layer.add_adapter("other", dtype="float32")
