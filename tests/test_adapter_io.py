"""PEFT-format save / load: exact round trips, the file layout, atomic writes, and clear errors that leave the
model unchanged for corrupt, truncated or mismatched files."""
import json
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from fastpeft import LoraConfig, active_adapter, adapter_config, adapter_names, inject, load_adapter, save_adapter, set_adapter
from fastpeft.methods import files as adapter_files
from fastpeft import api as adapter_io
from fastpeft.methods.lora.targets import lora_layers
from tests.budget import examples
from tests.model_cases import (assert_unchanged, gpt2_batch, hidden, randomize_adapter, snapshot,
                               tiny_gpt2)
from tests.model_cases import one_thread  # noqa: F401  (autouse fixture)

LAYERS = ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"]


def saved(tmp_path, config: LoraConfig, seed: int = 0, name: str = "default"):
    """A trained-looking adapter on tiny GPT-2, saved; returns (model, directory)."""
    model = inject(tiny_gpt2(), config, adapter_name=name)
    randomize_adapter(model, name, seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and "lora_" not in n:
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    directory = tmp_path / f"adapter-{seed}"
    save_adapter(model, directory, adapter_name=name)
    return model, directory


def adapter_state(model, name="default") -> dict:
    return {k: v for k, v in model.state_dict().items()
            if f".{name}" in k or k.endswith("bias") and "original_module" not in k}


@given(r=st.integers(1, 6), alpha=st.sampled_from([1, 3.5, 16, -8]), rslora=st.booleans(),
       targets=st.lists(st.sampled_from(LAYERS), min_size=1, max_size=4, unique=True),
       bias=st.sampled_from(["none", "lora_only", "all"]), save_ln_f=st.booleans(), seed=st.integers(0, 99))
@examples(6)
def test_save_then_load_round_trips_exactly(tmp_path_factory, r, alpha, rslora, targets, bias, save_ln_f, seed):
    config = LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=targets, bias=bias,
                        modules_to_save=["ln_f"] if save_ln_f else None)
    model, directory = saved(tmp_path_factory.mktemp("io"), config, seed)
    loaded = load_adapter(tiny_gpt2(), directory, adapter_name="restored")
    assert active_adapter(loaded) == "restored"
    assert adapter_config(loaded, "restored") == config.replace(base_model_name_or_path=None)
    theirs = adapter_state(loaded, "restored")
    ours = {k.replace(".default", ".restored"): v for k, v in adapter_state(model).items()}
    assert theirs.keys() == ours.keys()
    for k, v in ours.items():
        assert torch.equal(theirs[k], v), k
    assert torch.equal(hidden(loaded, gpt2_batch()), hidden(model, gpt2_batch()))


def test_file_layout_is_peft(tmp_path):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], bias="lora_only", modules_to_save=["ln_f"])
    model, directory = saved(tmp_path, config)
    assert sorted(os.listdir(directory)) == ["adapter_config.json", "adapter_model.safetensors"]
    tensors = load_file(directory / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        **{f"base_model.model.h.{i}.attn.c_attn.lora_A.weight": (4, 64) for i in (0, 1)},
        **{f"base_model.model.h.{i}.attn.c_attn.lora_B.weight": (192, 4) for i in (0, 1)},
        **{f"base_model.model.h.{i}.attn.c_attn.base_layer.bias": (192,) for i in (0, 1)},
        "base_model.model.ln_f.weight": (64,), "base_model.model.ln_f.bias": (64,)}
    assert torch.equal(tensors["base_model.model.h.1.attn.c_attn.lora_B.weight"],
                       model.h[1].attn.c_attn.lora_B["default"])
    written = json.loads((directory / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORA" and written["fan_in_fan_out"] is True
    assert (written["r"], written["lora_alpha"], written["target_modules"], written["modules_to_save"]) == \
        (4, 8, ["c_attn"], ["ln_f"])


def test_rank_and_alpha_patterns_round_trip(tmp_path):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], rank_pattern={r"h\.1\.mlp\.c_fc": 2},
                        alpha_pattern={"c_attn": 3})
    model, directory = saved(tmp_path, config)
    loaded = load_adapter(tiny_gpt2(), directory)
    settings = {path: (m.settings["default"].r, m.settings["default"].lora_alpha) for path, m in lora_layers(loaded)}
    assert settings == {"h.0.attn.c_attn": (4, 3), "h.1.attn.c_attn": (4, 3), "h.0.mlp.c_fc": (4, 8),
                        "h.1.mlp.c_fc": (2, 8)}
    assert torch.equal(hidden(loaded, gpt2_batch()), hidden(model, gpt2_batch()))


def test_bf16_round_trip_and_float_cast(tmp_path):
    config = LoraConfig(r=4, target_modules=["c_fc"])
    model32, directory = saved(tmp_path, config)
    master = load_adapter(tiny_gpt2().to(torch.bfloat16), directory)  # fp32 weights kept, as in PEFT
    assert torch.equal(master.h[0].mlp.c_fc.lora_A["default"], model32.h[0].mlp.c_fc.lora_A["default"])
    bf16 = load_adapter(tiny_gpt2().to(torch.bfloat16), directory, autocast_adapter_dtype=False)  # cast
    layer = bf16.h[0].mlp.c_fc
    assert layer.lora_A["default"].dtype == torch.bfloat16
    assert torch.equal(layer.lora_A["default"], model32.h[0].mlp.c_fc.lora_A["default"].bfloat16())
    save_adapter(bf16, tmp_path / "bf16")
    assert load_file(tmp_path / "bf16" / "adapter_model.safetensors")[
        "base_model.model.h.0.mlp.c_fc.lora_A.weight"].dtype == torch.bfloat16


def test_load_into_existing_adapter_overwrites_its_weights(tmp_path):
    config = LoraConfig(r=4, target_modules=["c_attn"])
    model, directory = saved(tmp_path, config, seed=1)
    other = inject(tiny_gpt2(), config)
    load_adapter(other, directory)
    assert torch.equal(hidden(other, gpt2_batch()), hidden(model, gpt2_batch()))
    different = inject(tiny_gpt2(), config.replace(lora_alpha=32))
    before = snapshot(different)
    with pytest.raises(ValueError, match=r"h\.0\.attn\.c_attn: model r=4, alpha=32.*file r=4, alpha=8"):
        load_adapter(different, directory)
    assert_unchanged(different, before)
    for change, message in (({"bias": "all"}, "bias: model 'all', file 'none'"),
                            ({"lora_dropout": 0.1}, "lora_dropout: model 0.1, file 0.0"),
                            ({"modules_to_save": ["ln_f"]}, r"modules_to_save: model \('ln_f',\), file None")):
        different = inject(tiny_gpt2(), config.replace(**change))  # the file's bias "all" would overwrite frozen biases
        before = snapshot(different)
        with pytest.raises(ValueError, match=f"does not match existing adapter 'default'.*{message}"):
            load_adapter(different, directory)
        assert_unchanged(different, before)


# --- errors leave the model unchanged -----------------------------------------------------------------------------
def rewrite(directory, change) -> None:
    path = directory / "adapter_model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


A0 = "base_model.model.h.0.attn.c_attn.lora_A.weight"


@pytest.mark.parametrize("damage, message", [
    (lambda d: rewrite(d, lambda t: t.pop(A0)), rf"missing keys \(1\): {A0}"),
    (lambda d: rewrite(d, lambda t: t.update({"base_model.model.h.0.attn.c_fc.lora_A.weight": torch.zeros(4, 64)})),
     r"unexpected keys \(1\): base_model.model.h.0.attn.c_fc.lora_A.weight"),
    (lambda d: rewrite(d, lambda t: t.update({A0: torch.zeros(5, 64)})),
     rf"shape mismatches \(1\): {A0}: file \(5, 64\), model \(4, 64\)"),
    (lambda d: rewrite(d, lambda t: t.update({A0: torch.zeros(4, 64, dtype=torch.int32)})),
     rf"dtype mismatches \(1\): {A0}: file torch.int32, model torch.float32"),
    (lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}xx"),
     "not a readable safetensors file"),
    (lambda d: (d / "adapter_model.safetensors").write_bytes((d / "adapter_model.safetensors").read_bytes()[:-100]),
     "not a readable safetensors file .corrupt or truncated"),
    (lambda d: (d / "adapter_model.safetensors").unlink(), "adapter weights .* do not exist"),
    (lambda d: (d / "adapter_config.json").write_text("{\"r\": 4,"), "adapter_config.json is not valid JSON"),
    (lambda d: (d / "adapter_config.json").unlink(), "no adapter_config.json in"),
    (lambda d: edit_config(d, peft_type="IA3"), "peft_type is 'IA3'; fastpeft loads 'LORA'"),
    (lambda d: edit_config(d, use_dora=True), r"features fastpeft does not support: \{'use_dora': True\}"),
    (lambda d: edit_config(d, r=0), r"adapter_config.json: r \(a LoRA rank\) must be an int >= 1, got 0"),
    (lambda d: edit_config(d, target_modules=["q_proj"]), r"\['q_proj'\] matches no module of GPT2Model"),
])
def test_bad_files_give_clear_errors_and_change_nothing(tmp_path, damage, message):
    _, directory = saved(tmp_path, LoraConfig(r=4, target_modules=["c_attn"]))
    damage(directory)
    model = inject(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_fc"]), adapter_name="other")
    before = snapshot(model)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_adapter(model, directory)
    assert_unchanged(model, before)
    assert adapter_names(model) == ["other"] and active_adapter(model) == "other"


def edit_config(directory, **changes) -> None:
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("into", ["new adapter", "existing adapter"])
def test_failure_while_copying_rolls_back(tmp_path, monkeypatch, into):
    config = LoraConfig(r=4, target_modules=["c_attn"], bias="lora_only")
    _, directory = saved(tmp_path, config)  # its c_attn biases differ from the base model's
    model = inject(tiny_gpt2(), config if into == "existing adapter" else config.replace(r=2), adapter_name="other")
    name = "other" if into == "existing adapter" else "default"
    before = snapshot(model)
    calls = []

    def set_adapter_failing_once(model, name):
        calls.append(name)
        if len(calls) == 1:
            raise RuntimeError("simulated failure")
        set_adapter(model, name)
    monkeypatch.setattr(adapter_io, "set_adapter", set_adapter_failing_once)
    with pytest.raises(RuntimeError, match="simulated"):
        load_adapter(model, directory, adapter_name=name)
    assert_unchanged(model, before)


def test_writes_are_atomic(tmp_path, monkeypatch):
    model, directory = saved(tmp_path, LoraConfig(r=4, target_modules=["c_attn"]))
    files = {name: (directory / name).read_bytes() for name in os.listdir(directory)}
    randomize_adapter(model, seed=5)

    def failing_save(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")
    monkeypatch.setattr(adapter_files, "save_file", failing_save)
    for target in (directory, tmp_path / "new"):
        with pytest.raises(OSError, match="disk full"):
            save_adapter(model, target)
    assert {name: (directory / name).read_bytes() for name in os.listdir(directory)} == files
    assert sorted(os.listdir(tmp_path)) == ["adapter-0"]  # no new directory, no temporary left behind


def test_save_errors(tmp_path):
    model = inject(tiny_gpt2(), LoraConfig(target_modules=["c_attn"]))
    with pytest.raises(ValueError, match=r"unknown adapter_name 'b': it has \['default'\]"):
        save_adapter(model, tmp_path / "x", adapter_name="b")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is not a directory"):
        save_adapter(model, tmp_path / "file")
    with pytest.raises(ValueError, match="has none"):
        save_adapter(tiny_gpt2(), tmp_path / "y")


def test_loaded_adapter_sits_beside_existing_ones(tmp_path):
    config = LoraConfig(r=4, target_modules=["c_attn"])
    model_a, dir_a = saved(tmp_path, config, seed=1)
    model_b, dir_b = saved(tmp_path, config.replace(target_modules=["c_attn", "c_fc"]), seed=2)
    model = load_adapter(tiny_gpt2(), dir_a, adapter_name="a")
    load_adapter(model, dir_b, adapter_name="b")
    assert adapter_names(model) == ["a", "b"] and active_adapter(model) == "b"
    assert torch.equal(hidden(model, gpt2_batch()), hidden(model_b, gpt2_batch()))
    set_adapter(model, "a")
    assert torch.equal(hidden(model, gpt2_batch()), hidden(model_a, gpt2_batch()))


def test_bias_all_beside_another_adapter_saves_biases_as_a_single_adapter_model_has_them(tmp_path):
    """Adapter 'a' wraps c_fc; 'b' (bias="all") wraps c_attn: b's file names c_fc's bias `c_fc.bias`, as PEFT's
    model with b alone has it, and loads into a fresh model and into one where 'a' wraps c_fc again."""
    model = inject(tiny_gpt2(), LoraConfig(target_modules=["c_fc"]), adapter_name="a")
    inject(model, LoraConfig(target_modules=["c_attn"], bias="all"), adapter_name="b")
    randomize_adapter(model, "b", seed=2)
    with torch.no_grad():
        model.h[0].mlp.c_fc.base_layer.bias.add_(1.0)
    save_adapter(model, tmp_path, adapter_name="b")
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.h.0.mlp.c_fc.bias" in keys and not any("c_fc.base_layer" in k for k in keys)
    expected = hidden(model, gpt2_batch())
    for target in (tiny_gpt2(), inject(tiny_gpt2(), LoraConfig(target_modules=["c_fc"]), adapter_name="a")):
        load_adapter(target, tmp_path, adapter_name="b")
        torch.testing.assert_close(hidden(target, gpt2_batch()), expected, rtol=0, atol=0)
