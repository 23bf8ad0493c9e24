"""LoRA's hyper-parameters: LoraConfig, LoraLinear and LoraLinear.add_adapter refuse the same values with the same
message, and a refused LoraLinear leaves the caller's layer as it was."""
import math

import pytest
import torch
from torch import nn

from fastpeft import LoraLinear
from fastpeft import LoraConfig

RANK = "r (a LoRA rank) must be an int >= 1, got "
ALPHA = "lora_alpha must be a finite non-zero number, got "
DROPOUT = "lora_dropout must be a float in [0, 1), got "
BAD = [
    ("r", 0, RANK + "0"), ("r", -2, RANK + "-2"), ("r", True, RANK + "True"), ("r", 2.0, RANK + "2.0"),
    ("r", "4", RANK + "'4'"), ("r", None, RANK + "None"),
    ("lora_alpha", 0, ALPHA + "0"), ("lora_alpha", 0.0, ALPHA + "0.0"), ("lora_alpha", True, ALPHA + "True"),
    ("lora_alpha", False, ALPHA + "False"), ("lora_alpha", math.nan, ALPHA + "nan"),
    ("lora_alpha", math.inf, ALPHA + "inf"), ("lora_alpha", -math.inf, ALPHA + "-inf"),
    ("lora_alpha", "16", ALPHA + "'16'"),
    ("lora_dropout", 1.0, DROPOUT + "1.0"), ("lora_dropout", -0.1, DROPOUT + "-0.1"),
    ("lora_dropout", True, DROPOUT + "True"), ("lora_dropout", False, DROPOUT + "False"),
    ("lora_dropout", math.nan, DROPOUT + "nan"), ("lora_dropout", "0.1", DROPOUT + "'0.1'"),
]


def refusal(make) -> str:
    with pytest.raises(ValueError) as error:
        make()
    return str(error.value)


@pytest.mark.parametrize("name, value, message", BAD, ids=[f"{n}={v!r}" for n, v, _ in BAD])
def test_config_layer_and_add_adapter_refuse_alike(name, value, message):
    layer = LoraLinear.from_linear(nn.Linear(4, 6))
    assert refusal(lambda: LoraConfig(target_modules=["q"], **{name: value})) == message
    assert refusal(lambda: LoraLinear.from_linear(nn.Linear(4, 6), **{name: value})) == message
    assert refusal(lambda: layer.add_adapter("other", **{name: value})) == message
    assert list(layer.settings) == ["default"]


@pytest.mark.parametrize("pattern, value, message", [
    ("rank_pattern", 0, "rank_pattern['q'] (a LoRA rank) must be an int >= 1, got 0"),
    ("alpha_pattern", True, "alpha_pattern['q'] must be a finite non-zero number, got True"),
])
def test_patterns_use_the_same_checks(pattern, value, message):
    assert refusal(lambda: LoraConfig(target_modules=["q"], **{pattern: {"q": value}})) == message


def test_negative_alpha_is_allowed_by_both_as_in_peft():
    """A negative alpha flips the update's sign; PEFT accepts it and saved files may carry it."""
    assert LoraConfig(target_modules=["q"], r=4, lora_alpha=-8).lora_alpha == -8
    assert LoraLinear.from_linear(nn.Linear(4, 6), r=4, lora_alpha=-8).settings["default"].scaling == -2.0


def test_rank_above_the_layer_width_is_allowed_as_in_peft():
    layer = LoraLinear.from_linear(nn.Linear(3, 2), r=5)
    assert layer.lora_A["default"].shape == (5, 3) and layer.lora_B["default"].shape == (2, 5)


@pytest.mark.parametrize("kwargs", [dict(r=0), dict(lora_alpha=0), dict(lora_dropout=1.0), dict(init="xavier"),
                                    dict(dtype="float32"), dict(adapter_name="a.b")])
def test_a_refused_layer_leaves_the_base_layer_trainable(kwargs):
    linear = nn.Linear(4, 6)
    linear.bias.requires_grad_(False)  # the caller's own choice, kept as well
    with pytest.raises(ValueError):
        LoraLinear.from_linear(linear, **kwargs)
    assert (linear.weight.requires_grad, linear.bias.requires_grad) == (True, False)


def test_a_built_layer_freezes_the_base_layer():
    linear = nn.Linear(4, 6)
    LoraLinear.from_linear(linear, r=2, dtype=torch.float32)
    assert not any(p.requires_grad for p in linear.parameters())
