"""Model-level LoRA API: config validation, target matching, trainable parameters, several named adapters,
whole-model merge / unmerge / merge_and_unload."""
import re

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from fastpeft import (BottleneckConfig, DiffPruningConfig, LoraConfig, ModulesToSave, active_adapter,
                            adapter_names, delete_adapter, disable_adapters, inject, merge, merge_and_unload,
                            print_trainable_parameters, set_adapter, trainable_parameters, unmerge)
from fastpeft.methods.lora.targets import lora_layers
from fastpeft.modules.lora import LoraLinear
from tests.model_cases import (assert_unchanged, gpt2_batch, hidden, minilm, minilm_batch, randomize_adapter,
                               snapshot, tiny_gpt2)
from tests.model_cases import one_thread  # noqa: F401  (autouse fixture)


# --- config -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    ({"r": 0}, "r .*int >= 1, got 0"), ({"r": 2.5}, "r .*got 2.5"), ({"r": True}, "r .*got True"),
    ({"lora_alpha": float("nan")}, "lora_alpha"), ({"lora_alpha": 0}, "lora_alpha"),
    ({"lora_dropout": 1.0}, r"lora_dropout .*\[0, 1\)"), ({"lora_dropout": -0.1}, "lora_dropout"),
    ({"target_modules": None}, "target_modules is required"), ({"target_modules": []}, "target_modules"),
    ({"target_modules": ["query", ""]}, "target_modules"), ({"target_modules": "(unclosed"}, "not a valid regex"),
    ({"bias": "some"}, "bias must be one of"), ({"modules_to_save": "classifier"}, "modules_to_save"),
    ({"init_lora_weights": "xavier"}, "init_lora_weights"), ({"rank_pattern": {"query": 0}}, "rank_pattern"),
    ({"alpha_pattern": {"(": 4}}, "alpha_pattern"), ({"task_type": "CHAT"}, "task_type"),
    ({"use_rslora": 1}, "use_rslora"),
])
def test_bad_config_values_are_named(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        LoraConfig(**{"target_modules": ["query"], **kwargs})


def test_config_normalises_targets_and_resolves_patterns():
    assert LoraConfig(target_modules=["value", "query", "value"]).target_modules == ("query", "value")
    assert LoraConfig(target_modules="ALL-LINEAR").target_modules == "all-linear"
    c = LoraConfig(r=4, lora_alpha=8, target_modules=["query"], rank_pattern={r"layer\.0\..*query": 2},
                   alpha_pattern={"query": 3})
    assert c.rank_and_alpha("encoder.layer.0.attention.self.query") == (2, 3)
    assert c.rank_and_alpha("encoder.layer.1.attention.self.query") == (4, 3)
    assert c.rank_and_alpha("encoder.layer.1.attention.self.value") == (4, 8)
    with pytest.raises(ValueError, match="r "):
        c.replace(r=0)


# --- targets --------------------------------------------------------------------------------------------------------
def wrapped(model) -> list[str]:
    return [path for path, _ in lora_layers(model)]


@pytest.mark.parametrize("targets, expected", [
    (["c_attn"], ["h.0.attn.c_attn", "h.1.attn.c_attn"]),
    (["attn.c_proj"], ["h.0.attn.c_proj", "h.1.attn.c_proj"]),
    (r"h\.1\..*c_(fc|attn)", ["h.1.attn.c_attn", "h.1.mlp.c_fc"]),
    ("c_attn", []),  # a regex must match the whole path
])
def test_target_matching_follows_peft(targets, expected):
    model = tiny_gpt2()
    if not expected:
        with pytest.raises(ValueError, match="matches no module"):
            inject(model, LoraConfig(target_modules=targets))
        return
    inject(model, LoraConfig(target_modules=targets))
    assert wrapped(model) == expected
    assert all(isinstance(m.base_layer, Conv1D) and m.fan_in_fan_out for _, m in lora_layers(model))


def test_all_linear_skips_the_output_head():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, bos_token_id=0, eos_token_id=0))
    inject(model, LoraConfig(target_modules="all-linear"))
    assert wrapped(model) == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                              "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    assert isinstance(model.lm_head, nn.Linear)


def test_unmatched_targets_list_module_names_and_change_nothing():
    model = tiny_gpt2()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"\['query', 'value'\] matches no module.*c_attn.*c_fc"):
        inject(model, LoraConfig(target_modules=["query", "value"]))
    with pytest.raises(ValueError, match=r"entries \['c_atn'\] match no module.*c_attn"):  # a typo beside a match
        inject(model, LoraConfig(target_modules=["c_atn", "c_fc"]))
    with pytest.raises(ValueError, match=r"cannot wrap.*h\.0\.attn \(GPT2Attention\)"):
        inject(model, LoraConfig(target_modules=["attn"]))
    assert_unchanged(model, before)


def test_bad_arguments():
    model = tiny_gpt2()
    with pytest.raises(TypeError, match=r"config must be a fastpeft method config \(LoraConfig, "
                                        r"BottleneckConfig, DiffPruningConfig.*\), got dict"):
        inject(model, {"target_modules": ["c_attn"]})
    with pytest.raises(ValueError, match="adapter_name"):
        inject(model, LoraConfig(target_modules=["c_attn"]), adapter_name="a.b")
    before = snapshot(model)
    for name in ("training", "keys", "to"):  # attributes of the ModuleDict / ParameterDict that hold adapters
        with pytest.raises(ValueError, match=f"adapter_name '{name}' is an attribute of torch's ModuleDict"):
            inject(model, LoraConfig(target_modules=["c_attn"]), adapter_name=name)
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="init_lora_weights='pissa'"):
        inject(model, LoraConfig(target_modules=["c_attn"], init_lora_weights="pissa"))
    inject(model, LoraConfig(target_modules=["c_attn"]))
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        inject(model, LoraConfig(target_modules=["c_proj"]))
    for call in (lambda: set_adapter(model, "nope"), lambda: delete_adapter(model, "nope")):
        with pytest.raises(ValueError, match=r"unknown adapter_name 'nope': it has \['default'\]"):
            call()
    with pytest.raises(ValueError, match="no fastpeft adapters"):
        with disable_adapters(tiny_gpt2()):
            pass


# --- trainable parameters -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias, modules_to_save, extra", [
    ("none", None, 0),
    ("lora_only", None, 2 * 192),  # the two c_attn biases
    ("all", None, 2 * (192 + 64 + 256 + 64 + 2 * 64) + 64),  # every bias: linears, layer norms, ln_f
    ("none", ["ln_f"], 2 * 64),  # a trainable copy of ln_f
])
def test_only_adapter_parameters_train(bias, modules_to_save, extra, capsys):
    model = tiny_gpt2()
    total_before = sum(p.numel() for p in model.parameters())
    inject(model, LoraConfig(r=4, target_modules=["c_attn"], bias=bias, modules_to_save=modules_to_save))
    lora = 2 * (4 * 64 + 192 * 4)
    copies = 2 * 64 if modules_to_save else 0
    assert trainable_parameters(model) == (lora + extra, total_before + lora + copies)
    print_trainable_parameters(model)
    assert re.fullmatch(rf"trainable params: {lora + extra:,d} \|\| all params: [\d,]+ \|\| trainable%: [\d.]+\n",
                        capsys.readouterr().out)
    out = hidden(model, gpt2_batch()).sum()
    out.backward()
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())


def test_fresh_adapter_is_the_identity_until_trained():
    base = minilm()
    expected = hidden(base, minilm_batch())
    model = inject(base, LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights="gaussian"))
    assert len(lora_layers(model)) == 12
    torch.testing.assert_close(hidden(model, minilm_batch()), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", [
    LoraConfig(r=4, lora_dropout=0.5, target_modules=["query"], modules_to_save=["pooler.dense"]),
    BottleneckConfig(placement="houlsby", bottleneck=8, dropout=0.5),
    DiffPruningConfig(target_modules=["query"]),
], ids=["lora", "adapter", "diff"])
@pytest.mark.parametrize("training", [False, True])
def test_wrappers_take_over_the_models_train_or_eval_mode(config, training):
    """A fresh wrapper is in training mode: put into an eval model as it was, it ran dropout at inference."""
    model = inject(minilm().train(training), config)
    assert {m.training for m in model.modules()} == {training}
    if isinstance(config, LoraConfig):
        randomize_adapter(model)  # B = 0 would hide dropout
    if not training:
        torch.testing.assert_close(hidden(model, minilm_batch()), hidden(model, minilm_batch()), rtol=0, atol=0)


# --- several adapters -----------------------------------------------------------------------------------------------
def test_named_adapters_switch_disable_and_delete():
    batch = gpt2_batch()
    model = tiny_gpt2()
    base_out = hidden(model, batch)
    inject(model, LoraConfig(r=2, target_modules=["c_attn"], modules_to_save=["ln_f"]), adapter_name="a")
    randomize_adapter(model, "a", seed=1)
    with torch.no_grad():
        model.ln_f.modules_to_save["a"].weight.mul_(1.5)
    a_out = hidden(model, batch)
    inject(model, LoraConfig(r=3, target_modules=["c_attn", "c_fc"]), adapter_name="b")
    randomize_adapter(model, "b", seed=2)
    assert active_adapter(model) == "b" and adapter_names(model) == ["a", "b"]
    b_out = hidden(model, batch)
    assert isinstance(model.ln_f, ModulesToSave) and model.ln_f.active_module is model.ln_f.original_module
    for out in (a_out, b_out):
        assert not torch.allclose(out, base_out, atol=1e-3)

    set_adapter(model, "a")
    torch.testing.assert_close(hidden(model, batch), a_out)
    assert model.h[0].mlp.c_fc.active_adapter is None  # a layer without "a" runs its base layer
    grads = {n for n, p in model.named_parameters() if p.requires_grad}
    assert grads == {f"h.{i}.attn.c_attn.lora_{ab}.a" for i in (0, 1) for ab in "AB"} | \
        {"ln_f.modules_to_save.a.weight", "ln_f.modules_to_save.a.bias"}

    with disable_adapters(model):
        torch.testing.assert_close(hidden(model, batch), base_out)
    torch.testing.assert_close(hidden(model, batch), a_out)

    delete_adapter(model, "a")
    assert active_adapter(model) == "b" and adapter_names(model) == ["b"]
    assert not isinstance(model.ln_f, ModulesToSave)
    torch.testing.assert_close(hidden(model, batch), b_out)
    delete_adapter(model, "b")
    assert not lora_layers(model) and adapter_names(model) == []
    assert isinstance(model.h[0].attn.c_attn, Conv1D)
    torch.testing.assert_close(hidden(model, batch), base_out)


# --- merge ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make, batch, targets, plain", [
    (tiny_gpt2, gpt2_batch, "all-linear", Conv1D),
    (minilm, minilm_batch, ["query", "value", "dense"], nn.Linear),
])
def test_merge_unmerge_and_unload(make, batch, targets, plain):
    model = inject(make(), LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_rslora=True))
    randomize_adapter(model)
    before = snapshot(model)
    expected = hidden(model, batch())
    with disable_adapters(model):
        base_out = hidden(model, batch())

    merge(model)
    assert all(m.merged for _, m in lora_layers(model))
    torch.testing.assert_close(hidden(model, batch()), expected, rtol=1e-4, atol=1e-4)
    with disable_adapters(model):
        torch.testing.assert_close(hidden(model, batch()), base_out, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="already merged"):
        merge(model)
    unmerge(model)
    assert_unchanged(model, before)  # bit-exact
    with pytest.raises(ValueError, match="no layer of the model is merged"):
        unmerge(model)

    plain_model = merge_and_unload(model)
    assert plain_model is model and not lora_layers(model) and adapter_names(model) == []
    assert not any(isinstance(m, (LoraLinear, ModulesToSave)) for m in model.modules())
    assert sum(isinstance(m, plain) for m in model.modules()) >= len(before["modules"]) // 20
    torch.testing.assert_close(hidden(model, batch()), expected, rtol=1e-4, atol=1e-4)


def test_merging_into_a_tied_weight_is_refused_before_anything_merges():
    """GPT-2's lm_head shares the input embedding: merging LoRA into it would change the embedding too."""
    model = GPT2LMHeadModel(tiny_gpt2().config)
    inject(model, LoraConfig(r=2, target_modules=["c_attn", "lm_head"]))
    randomize_adapter(model)
    before = snapshot(model)
    for fold in (merge, merge_and_unload):
        with pytest.raises(ValueError, match=r"lm_head's weight is shared with transformer.wte.weight \(tied"):
            fold(model)
        assert_unchanged(model, before)
        assert not any(layer.merged for _, layer in lora_layers(model))
    untied = GPT2LMHeadModel(GPT2Config(**{**tiny_gpt2().config.to_dict(), "tie_word_embeddings": False}))
    inject(untied, LoraConfig(r=2, target_modules=["lm_head"]))
    merge(untied)


def test_tie_weights_reties_the_wrapped_heads_base_layer():
    """transformers' tie_weights assigns lm_head.weight (PEFT's layers raise KeyError there)."""
    model = GPT2LMHeadModel(tiny_gpt2().config)
    inject(model, LoraConfig(r=2, target_modules=["lm_head"]))
    model.lm_head.base_layer.weight = nn.Parameter(model.transformer.wte.weight.detach().clone())  # untied
    model.tie_weights()
    assert model.lm_head.base_layer.weight is model.transformer.wte.weight is model.lm_head.weight
    assert "weight" not in dict(model.lm_head.named_parameters(recurse=False))


def test_merged_model_refuses_switching_and_new_adapters():
    model = inject(tiny_gpt2(), LoraConfig(target_modules=["c_attn"]), adapter_name="a")
    inject(model, LoraConfig(target_modules=["c_attn"]), adapter_name="b")
    merge(model)
    with pytest.raises(ValueError, match=r"\['b'\] are merged.*unmerge"):
        set_adapter(model, "a")
    with pytest.raises(ValueError, match="unmerge"):
        inject(model, LoraConfig(target_modules=["c_fc"]), adapter_name="c")
    with pytest.raises(ValueError, match="'b' is merged"):
        delete_adapter(model, "b")
    unmerge(model)
    set_adapter(model, "a")


def test_init_lora_weights_false_starts_off_the_identity_like_peft():
    batch = gpt2_batch()
    base_out = hidden(tiny_gpt2(), batch)
    model = inject(tiny_gpt2(), LoraConfig(target_modules=["c_fc"], init_lora_weights=False))
    assert all(m.lora_B["default"].abs().sum() > 0 for _, m in lora_layers(model))
    assert not torch.allclose(hidden(model, batch), base_out, atol=1e-4)
