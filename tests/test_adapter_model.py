"""Bottleneck adapters at module and model level: the module against the op's formula, placements on MiniLM (BERT)
and a tiny Llama, identity at init, trainable parameters, save / load round trips and errors that leave the model
unchanged, config errors, training, and `fastpeft train --method adapter`."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import fastpeft
from fastpeft import demo
from fastpeft.cli import main
from fastpeft.demo import packaged_model_dir
from fastpeft import (BottleneckConfig, LoraConfig, adapter_names, inject, load_adapter,
                      merge, merge_and_unload, save_adapter, trainable_parameters)
from fastpeft.methods.bottleneck.sites import BertParallelOutput, adapter_wrappers
from fastpeft.modules.adapter import NEAR_IDENTITY_STD, BottleneckAdapter, ParallelAdapter, SerialAdapter
from tests.model_cases import assert_unchanged, hidden, minilm, minilm_batch, snapshot, tiny_gpt2
from tests.model_cases import one_thread  # noqa: F401  (autouse fixture)
from tests.test_cli import NEGATIVE, POSITIVE, write_csv

PLACEMENTS = ("houlsby", "pfeiffer", "parallel")
MINILM_LAYERS = 6


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, max_position_embeddings=32)
    return LlamaForCausalLM(config).eval()


def llama_ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(seed))


def llama_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=llama_ids()).logits


def minilm_hidden(model) -> torch.Tensor:
    with torch.no_grad():
        return hidden(model, minilm_batch())


@torch.no_grad()
def randomize(model, seed: int = 0) -> None:
    """Trained-looking values for every trainable tensor (adapters, modules_to_save copies)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def placed(model) -> dict[str, str]:
    return {path: type(wrapper).__name__ for path, wrapper in adapter_wrappers(model)}


# --- module -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer_norm", [False, True])
def test_module_computes_the_adapter_formula(layer_norm):
    torch.manual_seed(0)
    adapter = BottleneckAdapter(24, reduction_factor=4, activation="gelu", scaling=0.5, layer_norm=layer_norm)
    assert (adapter.down.weight.shape, adapter.up.weight.shape) == ((6, 24), (24, 6))
    randomize(adapter)
    h, residual = torch.randn(3, 5, 24), torch.randn(3, 5, 24)
    x = F.layer_norm(h, (24,), adapter.layer_norm.weight, adapter.layer_norm.bias) if layer_norm else h
    branch = adapter.up(F.gelu(adapter.down(x)))
    torch.testing.assert_close(adapter(h), h + 0.5 * branch)  # the residual is the un-normalised input
    torch.testing.assert_close(adapter(h, residual=residual), residual + 0.5 * branch)


def test_module_inits():
    torch.manual_seed(0)
    h = torch.randn(4, 64)
    zero_up = BottleneckAdapter(64, bottleneck=8, init="zero-up")
    assert torch.equal(zero_up(h), h) and zero_up.down.weight.abs().max() > 0  # the down projection still learns
    near = BottleneckAdapter(64, bottleneck=8)
    assert 0 < near.up.weight.abs().max() <= 2 * NEAR_IDENTITY_STD
    assert 0 < (near(h) - h).norm() < 1e-2 * h.norm()


@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one of bottleneck and reduction_factor"),
    ({"bottleneck": 4, "reduction_factor": 2}, "exactly one"),
    ({"bottleneck": 0}, "bottleneck must be an int >= 1"), ({"reduction_factor": 0.5}, "reduction_factor"),
    ({"reduction_factor": 64}, "leaves no bottleneck for width d=16"),
    ({"bottleneck": 4, "activation": "tanh"}, "activation"), ({"bottleneck": 4, "init": "xavier"}, "init"),
    ({"bottleneck": 4, "dropout": 1.0}, "dropout"),
])
def test_module_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BottleneckAdapter(16, **kwargs)


def test_wrappers_compute_serial_and_parallel():
    torch.manual_seed(0)
    base, adapter = torch.nn.Linear(8, 12), BottleneckAdapter(12, bottleneck=3)
    randomize(adapter)
    x = torch.randn(5, 8)
    torch.testing.assert_close(SerialAdapter(base, adapter)(x), adapter(base(x)))
    mlp, beside = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.ReLU(), torch.nn.Linear(20, 12)), \
        BottleneckAdapter(12, bottleneck=3, scaling=4.0)
    randomize(beside)
    y = torch.randn(5, 12)
    branch = beside.up(F.relu(beside.down(y)))
    torch.testing.assert_close(ParallelAdapter(mlp, beside)(y), mlp(y) + 4.0 * branch)


# --- placements ---------------------------------------------------------------------------------------------------
def test_minilm_placements():
    layers = [f"encoder.layer.{i}" for i in range(MINILM_LAYERS)]
    houlsby = placed(inject(minilm(), BottleneckConfig(placement="houlsby", bottleneck=8)))
    assert houlsby == {**{f"{p}.attention.output.dropout": "SerialAdapter" for p in layers},
                       **{f"{p}.output.dropout": "SerialAdapter" for p in layers}}
    pfeiffer = placed(inject(minilm(), BottleneckConfig(placement="pfeiffer", bottleneck=8)))
    assert pfeiffer == {f"{p}.output.dropout": "SerialAdapter" for p in layers}
    parallel = placed(inject(minilm(), BottleneckConfig(placement="parallel", bottleneck=8)))
    assert parallel == {f"{p}.output": "BertParallelOutput" for p in layers}


def test_llama_placements():
    layers = ["model.layers.0", "model.layers.1"]
    houlsby = placed(inject(tiny_llama(), BottleneckConfig(placement="houlsby", bottleneck=8)))
    assert houlsby == {**{f"{p}.self_attn.o_proj": "SerialAdapter" for p in layers},
                       **{f"{p}.mlp.down_proj": "SerialAdapter" for p in layers}}
    pfeiffer = placed(inject(tiny_llama(), BottleneckConfig(placement="pfeiffer", bottleneck=8)))
    assert pfeiffer == {f"{p}.mlp.down_proj": "SerialAdapter" for p in layers}
    parallel = placed(inject(tiny_llama(), BottleneckConfig(placement="parallel", bottleneck=8)))
    assert parallel == {f"{p}.mlp": "ParallelAdapter" for p in layers}


def test_bert_serial_adapters_follow_the_projections_dropout_as_in_adapter_bert():
    """Training mode: LayerNorm(adapter(dropout(dense(h))) + input), the adapter seeing what dropout kept."""
    model = inject(minilm(), BottleneckConfig(placement="houlsby", bottleneck=8))
    randomize(model)
    model.train()
    for sublayer in (model.encoder.layer[0].attention.output, model.encoder.layer[0].output):
        hidden, residual = torch.randn(2, 5, sublayer.dense.in_features), torch.randn(2, 5, 384)
        torch.manual_seed(0)
        got = sublayer(hidden, residual)
        torch.manual_seed(0)
        dropped = sublayer.dropout.base_layer(sublayer.dense(hidden))
        assert not torch.equal(dropped, sublayer.dense(hidden))  # dropout is on
        expected = sublayer.LayerNorm(sublayer.dropout.adapter(dropped) + residual)
        torch.testing.assert_close(got, expected)


def test_bert_parallel_adapter_reads_the_ffn_input():
    """BertOutput with a parallel adapter: LayerNorm(dense(intermediate) + s * branch(ffn input) + ffn input)."""
    model = inject(minilm(), BottleneckConfig(placement="parallel", bottleneck=8, scaling=2.0))
    randomize(model)
    output = model.encoder.layer[0].output
    assert isinstance(output, BertParallelOutput)
    intermediate, ffn_input = torch.randn(2, 5, 1536), torch.randn(2, 5, 384)
    a, base = output.adapter, output.base_layer
    expected = base.LayerNorm(base.dense(intermediate) + 2.0 * a.up(F.relu(a.down(ffn_input))) + ffn_input)
    with torch.no_grad():
        torch.testing.assert_close(output(intermediate, ffn_input), expected)
        model.train()  # dropout acts on the FFN's output, not on the adapter's
        torch.manual_seed(0)
        got = output(intermediate, ffn_input)
        torch.manual_seed(0)
        ffn = base.dropout(base.dense(intermediate))
        torch.testing.assert_close(got, base.LayerNorm(ffn + 2.0 * a.up(F.relu(a.down(ffn_input))) + ffn_input))


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_zero_up_is_exactly_the_base_model_and_near_identity_is_close(placement):
    reference = minilm_hidden(minilm())
    for layer_norm in (False, True):
        zero_up = BottleneckConfig(placement=placement, bottleneck=16, init="zero-up", layer_norm=layer_norm)
        assert torch.equal(minilm_hidden(inject(minilm(), zero_up)), reference)
    near = minilm_hidden(inject(minilm(), BottleneckConfig(placement=placement, bottleneck=16, init="near-identity")))
    assert 0 < (near - reference).norm() < 0.05 * reference.norm()
    llama = tiny_llama()
    assert torch.equal(llama_logits(inject(copy.deepcopy(llama), BottleneckConfig(placement=placement, bottleneck=8,
                                                                               init="zero-up"))),
                       llama_logits(llama))


def test_default_init_is_zero_up_for_parallel_adapters_only():
    assert [BottleneckConfig(placement=p, bottleneck=8).init for p in PLACEMENTS] == ["near-identity", "near-identity",
                                                                                   "zero-up"]
    assert BottleneckConfig(placement="parallel", bottleneck=8, init="near-identity").init == "near-identity"
    llama = tiny_llama()
    assert torch.equal(llama_logits(inject(copy.deepcopy(llama), BottleneckConfig(placement="parallel", bottleneck=8))),
                       llama_logits(llama))


def test_unknown_architecture_names_its_module_types():
    model = tiny_gpt2()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"GPT2Model has neither. Its module types: \['GPT2Model', .*'GPT2Block'"):
        inject(model, BottleneckConfig(bottleneck=8))
    assert_unchanged(model, before)


# --- trainable parameters, merge, mixing ------------------------------------------------------------------------
def test_only_adapters_and_modules_to_save_train():
    model = inject(tiny_llama(), BottleneckConfig(placement="houlsby", bottleneck=8, layer_norm=True,
                                               modules_to_save=["lm_head"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter." in n or n.startswith("lm_head.modules_to_save.default.") for n in trainable)
    per_adapter = 2 * 64 * 8 + 8 + 64 + 2 * 64  # down, up, their biases, LayerNorm
    assert sum(p.numel() for n, p in model.named_parameters() if ".adapter." in n) == 4 * per_adapter
    assert trainable_parameters(model)[0] == 4 * per_adapter + 100 * 64


def test_merge_is_refused_and_a_model_holds_one_bottleneck_adapter():
    model = inject(tiny_llama(), BottleneckConfig(bottleneck=8))
    before = snapshot(model)
    for fn in (merge, merge_and_unload):
        with pytest.raises(ValueError, match="cannot be merged.*nonlinear"):
            fn(model)
    with pytest.raises(ValueError, match="already has bottleneck adapter 'default'; a model holds one"):
        inject(model, BottleneckConfig(bottleneck=4), adapter_name="other")
    with pytest.raises(ValueError, match="LoRA adapter 'lora' would adapt 'model.layers.0.self_attn.o_proj', where "
                                         "bottleneck adapter 'default' sits"):
        inject(model, LoraConfig(target_modules=["o_proj"]), adapter_name="lora")
    assert_unchanged(model, before)
    inject(model, LoraConfig(target_modules=["q_proj"]), adapter_name="lora")  # other modules: both run
    assert adapter_names(model) == ["default", "lora"]


# --- save / load --------------------------------------------------------------------------------------------------
def saved(tmp_path, config: BottleneckConfig):
    model = inject(tiny_llama(), config)
    randomize(model)
    save_adapter(model, tmp_path / "adapter")
    return model, tmp_path / "adapter"


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_save_load_round_trip_is_exact(tmp_path, placement):
    config = BottleneckConfig(placement=placement, reduction_factor=8, activation="silu", layer_norm=True, scaling=2.0,
                           modules_to_save=["lm_head"])
    model, directory = saved(tmp_path, config)
    written = json.loads((directory / "adapter_config.json").read_text())
    assert written["method"] == "bottleneck" and written["placement"] == placement
    assert BottleneckConfig.from_dict(written).replace(base_model_name_or_path=None) == config
    keys = load_file(directory / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.") for k in keys) and "base_model.model.lm_head.weight" in keys
    loaded = load_adapter(tiny_llama(), directory)
    assert adapter_names(loaded) == ["default"]
    assert torch.equal(llama_logits(loaded), llama_logits(model))
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert {n: p.requires_grad for n, p in loaded.named_parameters()} == \
        {n: p.requires_grad for n, p in model.named_parameters()}


def rewrite_weights(directory, change) -> None:
    path = directory / "adapter_model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def first_down(tensors) -> str:
    return next(k for k in sorted(tensors) if k.endswith("adapter.down.weight"))


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x00" * 10), "not a readable safetensors file"),
    (lambda d: rewrite_weights(d, lambda t: t.pop(first_down(t))), "missing keys .*adapter.down.weight"),
    (lambda d: rewrite_weights(d, lambda t: t.update(extra=torch.zeros(1))), "unexpected keys .*extra"),
    (lambda d: rewrite_weights(d, lambda t: t.update({first_down(t): torch.zeros(3, 64)})),
     r"shape mismatches .*file \(3, 64\), model \(8, 64\)"),
    (lambda d: rewrite_weights(d, lambda t: t.update({first_down(t): torch.zeros(8, 64, dtype=torch.int32)})),
     "dtype mismatches .*torch.int32"),
    (lambda d: (d / "adapter_config.json").write_text('{"method": "bottleneck_adapter", "bottleneck": 8, '
                                                      '"activation": "tanh"}'), "adapter_config.json: activation"),
    (lambda d: (d / "adapter_config.json").write_text('{"method": "bottleneck_adapter", "bottleneck": 8, '
                                                      '"rank": 2}'), r"unknown bottleneck adapter settings \['rank'\]"),
    (lambda d: (d / "adapter_config.json").write_text('{"method": "bottleneck_adapter", "placement": "pfeiffer", '
                                                      '"bottleneck": 8}'), "unexpected keys .*o_proj.adapter"),
])
def test_bad_files_are_named_and_leave_the_model_unchanged(tmp_path, damage, message):
    _, directory = saved(tmp_path, BottleneckConfig(placement="houlsby", bottleneck=8))
    damage(directory)
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        load_adapter(model, directory)
    assert_unchanged(model, before)
    assert not adapter_names(model)


def test_load_errors_for_models_that_cannot_take_the_adapter(tmp_path):
    trained, directory = saved(tmp_path, BottleneckConfig(bottleneck=8))
    before = snapshot(trained)
    with pytest.raises(ValueError, match=r"already has an adapter named 'default' \(bottleneck\)"):
        load_adapter(trained, directory)
    assert_unchanged(trained, before)
    gpt2 = tiny_gpt2()
    with pytest.raises(ValueError, match="GPT2Model has neither"):
        load_adapter(gpt2, directory)
    assert not adapter_names(gpt2)
    wider = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    with pytest.raises(ValueError, match="shape mismatches"):
        load_adapter(wider, directory)


def test_save_is_atomic_and_needs_a_known_adapter(tmp_path, monkeypatch):
    model, directory = saved(tmp_path, BottleneckConfig(bottleneck=8))
    files = {name: (directory / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")}
    randomize(model, seed=1)
    import fastpeft.methods.files as adapter_files

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(adapter_files, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, directory)
    assert {name: (directory / name).read_bytes() for name in files} == files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary directory left
    with pytest.raises(ValueError, match="unknown adapter_name 'other'"):
        save_adapter(model, tmp_path / "other", adapter_name="other")


# --- config -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    ({"placement": "sequential"}, "placement must be one of"), ({}, "exactly one of bottleneck and reduction_factor"),
    ({"bottleneck": 8, "reduction_factor": 16}, "exactly one"), ({"bottleneck": 2.5}, "bottleneck must be an int"),
    ({"reduction_factor": 0}, "reduction_factor must be a finite number >= 1"),
    ({"bottleneck": 8, "activation": "tanh"}, "activation must be one of"),
    ({"bottleneck": 8, "init": "zeros"}, "init must be one of"), ({"bottleneck": 8, "dropout": 1.0}, "dropout"),
    ({"bottleneck": 8, "dropout": True}, "dropout"), ({"bottleneck": 8, "scaling": 0}, "scaling"),
    ({"bottleneck": 8, "scaling": float("inf")}, "scaling"), ({"bottleneck": 8, "layer_norm": 1}, "layer_norm"),
    ({"bottleneck": 8, "modules_to_save": "lm_head"}, "modules_to_save"),
])
def test_bad_config_values_are_named(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        BottleneckConfig(**kwargs)


def test_config_errors_at_injection_leave_the_model_unchanged():
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match="modules_to_save=.*matches no module"):
        inject(model, BottleneckConfig(bottleneck=8, modules_to_save=["classifier"]))
    with pytest.raises(ValueError, match="modules_to_save names 'model.layers.0.mlp'.*adapter site"):
        inject(model, BottleneckConfig(placement="parallel", bottleneck=8, modules_to_save=["layers.0.mlp"]))
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.o_proj: .*no bottleneck for width d=64"):
        inject(model, BottleneckConfig(reduction_factor=100))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        inject("model", BottleneckConfig(bottleneck=8))
    assert_unchanged(model, before)


# --- training -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_training_steps_reduce_the_loss_and_touch_only_adapters(placement):
    """With layer_norm: the random Llama's sublayer outputs are ~1e-3, too small for a serial adapter to learn fast."""
    model = inject(tiny_llama(), BottleneckConfig(placement=placement, bottleneck=16, dropout=0.1, layer_norm=True))
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = llama_ids()
    model.train()
    losses = []
    for _ in range(15):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


# --- command line -------------------------------------------------------------------------------------------------
def test_train_method_adapter_end_to_end(tmp_path, capsys):
    tiny_csv = write_csv(tmp_path / "reviews.csv", [(t, "pos") for t in POSITIVE] + [(t, "neg") for t in NEGATIVE])
    out = tmp_path / "adapter"
    assert main(["train", "--method", "bottleneck", "--placement", "pfeiffer", "--bottleneck", "16",
                 "--model", str(packaged_model_dir()), "--data", str(tiny_csv), "--text-column", "review",
                 "--label-column", "sentiment", "--output-dir", str(out), "--epochs", "1", "--batch-size", "4",
                 "--max-length", "32", "--test-fraction", "0.25"]) == 0
    printed = capsys.readouterr().out
    assert "bottleneck adapters (pfeiffer), bottleneck 16" in printed
    assert "HF PEFT comparison skipped: no HF PEFT run of bottleneck on this model" in printed
    assert "reloaded" in printed and "merged" not in printed and "all checks passed" in printed
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["method"], config["placement"], config["bottleneck"]) == ("bottleneck", "pfeiffer", 16)
    assert config["modules_to_save"] == ["classifier", "pre_classifier", "score"]


def test_demo_method_adapter_is_wired_through(monkeypatch):
    """The full demo takes minutes on CPU; its run is the one `train` above exercises, so check the wiring here."""
    config = demo.demo_config(method="bottleneck").config
    assert isinstance(config, BottleneckConfig) and config.placement == "houlsby" and config.modules_to_save
    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda **kwargs: seen.update(kwargs) or [])
    assert main(["demo", "--method", "bottleneck", "--epochs", "1"]) == 0
    assert seen["method"] == "bottleneck" and seen["epochs"] == 1


def test_adapter_config_is_the_old_name_of_bottleneck_config_and_warns():
    with pytest.warns(FutureWarning, match="AdapterConfig is now fastpeft.BottleneckConfig"):
        old = fastpeft.AdapterConfig(bottleneck=8)
    assert isinstance(old, BottleneckConfig) and old.to_dict() == BottleneckConfig(bottleneck=8).to_dict()
    model = inject(tiny_llama(), old)
    assert fastpeft.adapter_config(model, "default").bottleneck == 8
