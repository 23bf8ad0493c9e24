"""The contract every registered method keeps, on a tiny BERT and a tiny Llama: injecting changes no output where the
method's init promises it; only the method's parameters train; save -> load into a fresh model gives the same outputs
bit for bit; delete restores every base parameter's bits; merge -> unmerge is bit-exact, or refused with the
method's reason; train / eval mode follows the model; a state_dict round trip gives the same outputs. Then several
methods on one model. Per-method test files keep only what is particular to each method."""
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel

import fastpeft
from fastpeft import methods
from fastpeft.methods import saved_modules
from fastpeft.methods.record import record
from tests.model_cases import one_thread  # noqa: F401  (autouse fixture)


def tiny_bert():
    torch.manual_seed(0)
    return BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                vocab_size=100, max_position_embeddings=32), add_pooling_layer=False).eval()


def tiny_llama():
    torch.manual_seed(0)
    return LlamaModel(LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                  intermediate_size=64, vocab_size=100, max_position_embeddings=32)).eval()


MODELS = {"bert": tiny_bert, "llama": tiny_llama}
ATTENTION = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"]}
INPUT = torch.arange(14).reshape(2, 7) % 100


@dataclass
class Case:
    """A config whose init leaves the model's output as it was, and what makes the adapter ready to save."""

    config: Callable[[str], object]  # model kind -> config
    ready: Callable = lambda model: None


CASES = {
    "lora": Case(lambda kind: fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules=ATTENTION[kind])),
    "bottleneck": Case(lambda kind: fastpeft.BottleneckConfig(bottleneck=4, init="zero-up")),
    "diff_pruning": Case(lambda kind: fastpeft.DiffPruningConfig(target_modules=ATTENTION[kind], density=0.1),
                         ready=fastpeft.project_to_density),
    "bitfit": Case(lambda kind: methods.named("bitfit").config_type(
        add_biases=ATTENTION[kind] if kind == "llama" else None)),  # Llama has no biases: new zero ones train
    "full_finetuning": Case(lambda kind: methods.named("full_finetuning").config_type()),
    "frozen_features": Case(lambda kind: methods.named("frozen_features").config_type(
        modules_to_save=["encoder.layer.1" if kind == "bert" else "layers.1"])),  # the top layer trains
    "prompt_tuning": Case(lambda kind: methods.named("prompt_tuning").config_type(num_virtual_tokens=4)),
    "prefix_tuning": Case(lambda kind: methods.named("prefix_tuning").config_type(num_virtual_tokens=4)),
    "multitask": Case(lambda kind: methods.named("multitask").config_type(tasks={  # heads beside the encoder
        "a": {"kind": "classification", "num_labels": 3}, "b": {"kind": "regression"},
        "t": {"kind": "token_classification", "num_labels": 2}})),
    "trainable_tokens": Case(lambda kind: methods.named("trainable_tokens").config_type(token_indices=[3, 9, 60])),
}
PARAMS = [(name, kind) for name in CASES for kind in MODELS]


def test_every_registered_method_has_a_case():
    assert set(CASES) == set(methods.names())


def output(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT).last_hidden_state


def base_state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def trained(name: str, kind: str, seed: int = 1):
    """A model with the method's adapter, made ready to save, its trainable parameters moved off their init."""
    model = fastpeft.inject(MODELS[kind](), CASES[name].config(kind))
    CASES[name].ready(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("name, kind", PARAMS)
def test_inject_keeps_the_output_and_trains_only_the_method(name, kind):
    model = MODELS[kind]()
    before = output(model)
    fastpeft.inject(model, CASES[name].config(kind))
    changes = methods.named(name).changes_output_at_init  # e.g. prompt tuning: new tokens from the start
    assert torch.equal(output(model), before) != changes
    method, config = methods.named(name), fastpeft.adapter_config(model, "default")
    trainable = [(key, p) for key, p in model.named_parameters() if p.requires_grad]
    claimed = method.trainable(model, "default", config) + saved_modules.parameters(model, "default")
    assert trainable and {id(p) for _, p in trainable} == {id(p) for p in claimed}
    wrapped = method.wrapped_paths(model, "default")
    assert all(any(key.startswith(path + ".") for path in wrapped) for key, _ in trainable)


@pytest.mark.parametrize("name, kind", PARAMS)
def test_save_then_load_into_a_fresh_model_is_bit_exact(tmp_path, name, kind):
    model = trained(name, kind)
    fastpeft.save_adapter(model, tmp_path)
    fresh = fastpeft.load_adapter(MODELS[kind](), tmp_path)
    assert torch.equal(output(fresh), output(model))
    assert fastpeft.adapter_names(fresh) == ["default"] and record(fresh).adapters["default"].method == name


@pytest.mark.parametrize("name, kind", PARAMS)
def test_delete_restores_every_base_parameter(name, kind):
    plain = MODELS[kind]()
    state, types = base_state(plain), [type(m) for m in plain.modules()]
    model = trained(name, kind)
    fastpeft.delete_adapter(model, "default")
    assert [type(m) for m in model.modules()] == types and not fastpeft.adapter_names(model)
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())


@pytest.mark.parametrize("name, kind", PARAMS)
def test_merge_then_unmerge_is_bit_exact_or_refused_with_the_reason(name, kind):
    model = trained(name, kind)
    method, before, state = methods.named(name), output(model), base_state(model)
    if method.cannot_merge:
        with pytest.raises(ValueError, match="cannot be merged"):
            fastpeft.merge(model)
        assert torch.equal(output(model), before)
        return
    if method.merged_paths(model):  # built merged (diff pruning): unmerge first
        fastpeft.unmerge(model)
        fastpeft.merge(model)
    else:
        fastpeft.merge(model)
        torch.testing.assert_close(output(model), before, rtol=1e-5, atol=1e-5)
        fastpeft.unmerge(model)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())


@pytest.mark.parametrize("name, kind", PARAMS)
def test_disable_runs_the_base_model(name, kind):
    plain_out = output(MODELS[kind]())
    model = trained(name, kind)
    adapted = output(model)
    with fastpeft.disable_adapters(model):
        assert torch.equal(output(model), plain_out)
    assert torch.equal(output(model), adapted)


@pytest.mark.parametrize("name, kind", PARAMS)
def test_train_and_eval_mode_follow_the_model(name, kind):
    model = trained(name, kind)
    wrapped = methods.named(name).wrapped_paths(model, "default")
    for mode in (True, False):
        model.train(mode)
        assert all(model.get_submodule(path).training == mode for path in wrapped)


@pytest.mark.parametrize("name, kind", PARAMS)
def test_state_dict_round_trip(name, kind):
    model = trained(name, kind)
    other = trained(name, kind, seed=2)
    other.load_state_dict(model.state_dict())
    assert torch.equal(output(other), output(model))


# --- several methods on one model ---------------------------------------------------------------------------------
def test_lora_on_attention_beside_bottleneck_adapters_on_the_ffn(tmp_path):
    model = tiny_bert()
    fastpeft.inject(model, fastpeft.LoraConfig(r=4, target_modules=["query", "value"]), adapter_name="attn")
    fastpeft.inject(model, fastpeft.BottleneckConfig(placement="pfeiffer", bottleneck=4), adapter_name="ffn")
    assert fastpeft.active_adapters(model) == ["attn", "ffn"]
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05)
    trainable = {key for key, p in model.named_parameters() if p.requires_grad}
    assert any(".lora_" in key for key in trainable) and any(".adapter." in key for key in trainable)
    for name in ("attn", "ffn"):
        fastpeft.save_adapter(model, tmp_path / name, adapter_name=name)
    fresh = tiny_bert()
    for name in ("attn", "ffn"):
        fastpeft.load_adapter(fresh, tmp_path / name, adapter_name=name)
    assert torch.equal(output(fresh), output(model))
    with pytest.raises(ValueError, match="bottleneck adapters cannot be merged"):
        fastpeft.merge(model)
    fastpeft.delete_adapter(model, "ffn")
    fastpeft.merge(model)  # LoRA alone merges
    assert fastpeft.adapter_names(model) == ["attn"]


@pytest.mark.parametrize("first, second, message", [
    (fastpeft.LoraConfig(target_modules=["output.dense"]),
     fastpeft.BottleneckConfig(placement="parallel", bottleneck=4),
     r"bottleneck adapter 'b' would adapt 'encoder.layer.0.output', where LoRA adapter 'a' sits "
     r"at 'encoder.layer.0.output.dense'"),
    (fastpeft.DiffPruningConfig(target_modules=["query"]), fastpeft.LoraConfig(target_modules=["query"]),
     r"LoRA adapter 'b' would adapt 'encoder.layer.0.attention.self.query', where diff pruning adapter 'a'"),
    (fastpeft.LoraConfig(target_modules=["query"], modules_to_save=["pooler"]),
     fastpeft.DiffPruningConfig(target_modules=["key"], modules_to_save=["pooler"]), r"would adapt 'pooler'"),
])
def test_two_methods_on_one_module_are_an_error_naming_both(first, second, message):
    model = BertModel(tiny_bert().config)  # with its pooler
    fastpeft.inject(model, first, adapter_name="a")
    before = base_state(model)
    with pytest.raises(ValueError, match=message):
        fastpeft.inject(model, second, adapter_name="b")
    after = model.state_dict()
    assert fastpeft.adapter_names(model) == ["a"] and all(torch.equal(after[k], v) for k, v in before.items())
