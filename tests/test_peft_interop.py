"""Interop with the real `peft` package: the same config dict, files that load both ways, and the same outputs and
gradients for the same adapter on BERT-style (MiniLM, nn.Linear) and GPT-2-style (Conv1D) models."""
import copy

import peft
import pytest
import torch

from fastpeft import LoraConfig, inject, load_adapter, save_adapter
from fastpeft.methods.lora.targets import lora_layers
from tests.model_cases import gpt2_batch, hidden, minilm, minilm_batch, randomize_adapter, tiny_gpt2
from tests.model_cases import one_thread  # noqa: F401  (autouse fixture)
from tests.peft_layout import comparable

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

MODELS = {"minilm": (minilm, minilm_batch, False), "gpt2": (tiny_gpt2, gpt2_batch, True)}
CASES = [  # (model, LoraConfig kwargs shared by fastpeft and peft)
    ("minilm", dict(r=4, lora_alpha=8, target_modules=["query", "value"])),
    ("minilm", dict(r=8, lora_alpha=4, target_modules=r".*layer\.[02]\..*(key|dense)", use_rslora=True,
                    bias="lora_only", rank_pattern={"key": 2}, alpha_pattern={r"layer\.2\..*": 16})),
    ("minilm", dict(r=2, lora_alpha=2, target_modules="all-linear", modules_to_save=["pooler"], bias="all")),
    ("gpt2", dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj"], modules_to_save=["ln_f"])),
    ("gpt2", dict(r=3, lora_alpha=6, target_modules="all-linear", bias="all", use_rslora=True)),
]
IDS = [f"{name}-{i}" for i, (name, _) in enumerate(CASES)]


def peft_model(base, kwargs: dict, fan_in_fan_out: bool):
    return peft.get_peft_model(base, peft.LoraConfig(**kwargs, fan_in_fan_out=fan_in_fan_out)).eval()


def test_config_dict_is_what_peft_writes():
    kwargs = dict(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["value", "query"], use_rslora=True,
                  bias="lora_only", modules_to_save=["classifier"], init_lora_weights="gaussian",
                  rank_pattern={"query": 2}, alpha_pattern={"value": 4}, task_type="SEQ_CLS")
    theirs = peft.LoraConfig(**kwargs).to_dict()
    theirs = {k: sorted(v) if isinstance(v, set) else v for k, v in theirs.items()}
    ours = LoraConfig(**kwargs).to_peft_dict(inference_mode=False)
    ours, expected = comparable(ours, {**theirs, "peft_type": "LORA"})
    assert ours == expected
    assert LoraConfig.from_peft_dict(theirs) == LoraConfig(**kwargs)


@pytest.mark.parametrize("name, kwargs", CASES, ids=IDS)
def test_peft_loads_what_fastpeft_saves(tmp_path, name, kwargs):
    make, batch, _ = MODELS[name]
    base = make()
    ours = inject(copy.deepcopy(base), LoraConfig(**kwargs))
    randomize_adapter(ours, seed=3)
    with torch.no_grad():  # move the saved biases / module copies off their base values too
        for n, p in ours.named_parameters():
            if p.requires_grad and "lora_" not in n:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(4)))
    save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    expected = hidden(ours, batch())
    assert not torch.allclose(expected, hidden(make(), batch()), atol=1e-3)
    torch.testing.assert_close(hidden(theirs, batch()), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, kwargs", CASES, ids=IDS)
def test_fastpeft_loads_what_peft_trained(tmp_path, name, kwargs):
    make, batch, fan_in_fan_out = MODELS[name]
    base = make()
    theirs = peft_model(copy.deepcopy(base), kwargs, fan_in_fan_out)
    optimizer = torch.optim.Adam([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        hidden(theirs, batch()).square().mean().backward()
        optimizer.step()
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(base, tmp_path)
    expected = hidden(theirs, batch())
    assert not torch.allclose(expected, hidden(make(), batch()), atol=1e-3)
    torch.testing.assert_close(hidden(ours, batch()), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, kwargs", [CASES[1], CASES[4]], ids=[IDS[1], IDS[4]])
def test_same_outputs_and_gradients_as_peft(name, kwargs):
    make, batch, fan_in_fan_out = MODELS[name]
    base = make()
    ours = inject(copy.deepcopy(base), LoraConfig(**kwargs))
    randomize_adapter(ours, seed=7)
    theirs = peft_model(base, kwargs, fan_in_fan_out)
    layers = lora_layers(ours)
    peft_layers = [theirs.base_model.model.get_submodule(path) for path, _ in layers]
    assert sorted(n for n, m in theirs.base_model.model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)) \
        == sorted(path for path, _ in layers)
    with torch.no_grad():
        for (_, layer), their in zip(layers, peft_layers):
            assert their.scaling["default"] == layer.settings["default"].scaling
            their.lora_A["default"].weight.copy_(layer.lora_A["default"])
            their.lora_B["default"].weight.copy_(layer.lora_B["default"])

    probe = torch.randn(hidden(ours, batch()).shape, generator=torch.Generator().manual_seed(0))
    outputs = []
    for model in (ours, theirs):
        out = hidden(model, batch())
        (out * probe).sum().backward()
        outputs.append(out)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
    for (path, layer), their in zip(layers, peft_layers):
        for ab in "AB":
            mine = getattr(layer, f"lora_{ab}")["default"].grad
            other = getattr(their, f"lora_{ab}")["default"].weight.grad
            assert mine is not None and mine.abs().sum() > 0, (path, ab)
            assert_close_to_scale(mine, other, f"{path}.lora_{ab}")
        if kwargs.get("bias") == "lora_only":
            assert_close_to_scale(layer.base_layer.bias.grad, their.base_layer.bias.grad, f"{path} bias")


def assert_close_to_scale(actual, expected, what: str) -> None:
    """fp32 agreement up to summation order and fused multiply-adds, relative to the gradient's scale (floored: key
    biases get ~0 gradient). Rounding differences grow through the backward of six layers: up to ~2.5e-5 seen."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=0, atol=5e-5 * max(scale, 1.0), msg=what)


@pytest.mark.parametrize("modules_to_save", [None, ["ln_f"]])
def test_seq_cls_trains_and_saves_the_classification_head_as_peft_does(tmp_path, modules_to_save):
    from transformers import GPT2Config, GPT2ForSequenceClassification
    torch.manual_seed(0)
    base = GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, num_labels=3,
                                                    pad_token_id=0, bos_token_id=0, eos_token_id=0)).eval()
    kwargs = dict(target_modules=["c_attn"], task_type="SEQ_CLS", modules_to_save=modules_to_save)
    ours = inject(copy.deepcopy(base), LoraConfig(**kwargs))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    ours_trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    theirs_trainable = {n.removeprefix("base_model.model.").replace(".default.weight", ".default")
                        if "lora_" in n else n.removeprefix("base_model.model.")
                        for n, p in theirs.named_parameters() if p.requires_grad}
    assert "score.modules_to_save.default.weight" in ours_trainable and ours_trainable == theirs_trainable
    randomize_adapter(ours, seed=1)
    with torch.no_grad():
        ours.score.modules_to_save["default"].weight.add_(1.0)
    save_adapter(ours, tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    batch = gpt2_batch()
    torch.testing.assert_close(loaded(**batch).logits, ours(**batch).logits, rtol=1e-5, atol=1e-5)


def test_half_precision_models_get_float32_lora_weights_as_in_peft(tmp_path):
    config = dict(r=4, lora_alpha=8, target_modules=["query"])
    theirs = peft.get_peft_model(minilm().to(torch.bfloat16), peft.LoraConfig(**config))
    ours = inject(minilm().to(torch.bfloat16), LoraConfig(**config))
    their_dtypes = {p.dtype for n, p in theirs.named_parameters() if "lora_" in n}
    assert {p.dtype for n, p in ours.named_parameters() if "lora_" in n} == their_dtypes == {torch.float32}
    assert hidden(ours, minilm_batch()).dtype == torch.bfloat16
    randomize_adapter(ours)
    save_adapter(ours, tmp_path)
    loaded = load_adapter(minilm().to(torch.bfloat16), tmp_path)
    for (_, a), (_, b) in zip(lora_layers(ours), lora_layers(loaded)):
        assert torch.equal(a.lora_A["default"], b.lora_A["default"]) and b.lora_B["default"].dtype == torch.float32
    torch.testing.assert_close(hidden(loaded, minilm_batch()), hidden(ours, minilm_batch()), rtol=0, atol=0)
    kept = inject(minilm().to(torch.bfloat16), LoraConfig(**config), autocast_adapter_dtype=False)
    assert {p.dtype for n, p in kept.named_parameters() if "lora_" in n} == {torch.bfloat16}
