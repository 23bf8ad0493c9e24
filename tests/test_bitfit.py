"""BitFit on MiniLM with a classifier head: only biases (and the head's copy) train, no weight gets a gradient,
the loss falls, the frozen weights keep their bits, save / load is exact, merge is refused with the reason while
merge_and_unload keeps the trained biases, and bad options are errors naming the argument."""

import pytest
import torch

import fastpeft
from fastpeft.methods.bitfit import BitFitConfig
from fastpeft.methods.files import PREFIX
from tests.model_cases import minilm_batch, minilm_classifier
from tests.model_cases import one_thread  # noqa: F401  (autouse fixture)
from tests.test_method_contract import tiny_llama


BATCH = {**minilm_batch(), "labels": torch.tensor([0, 1])}


def bitfit(model, **kwargs):
    return fastpeft.inject(model, BitFitConfig(modules_to_save=["classifier"], **kwargs))


def train_steps(model, steps: int = 6, lr: float = 1e-2) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**BATCH).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_only_biases_and_the_head_get_gradients_and_the_loss_falls():
    model = bitfit(minilm_classifier())
    frozen = {k: p.detach().clone() for k, p in model.named_parameters() if not p.requires_grad}
    model(**BATCH).loss.backward()
    grads = {k: p.grad for k, p in model.named_parameters()}
    biases = [k for k in grads if k.endswith(".bias") and "classifier" not in k]
    assert len(biases) == 1 + 6 * 8 + 1 and all(grads[k] is not None for k in biases)
    assert all(grads[k] is None for k in grads if k.endswith(".weight") and "modules_to_save" not in k)
    model.zero_grad(set_to_none=True)
    losses = train_steps(model)
    assert losses[-1] < 0.5 * losses[0]
    after = dict(model.named_parameters())
    assert all(torch.equal(after[k], v) for k, v in frozen.items())  # every weight, and the original head
    assert not any(torch.equal(after[k], minilm_classifier().get_parameter(k)) for k in biases[:5])


def test_bias_pattern_trains_only_the_matching_biases_and_leaves_room_for_lora():
    model = bitfit(minilm_classifier(), bias_pattern=r"intermediate|output\.dense")
    trainable = [k for k, p in model.named_parameters() if p.requires_grad and "classifier" not in k]
    assert trainable and all(k.endswith("bias") and ("intermediate" in k or "output.dense" in k) for k in trainable)
    fastpeft.inject(model, fastpeft.LoraConfig(r=2, target_modules=["query"]), adapter_name="lora")
    with pytest.raises(ValueError, match="LoRA adapter 'v' would adapt .*intermediate.dense', where BitFit adapter"):
        fastpeft.inject(model, fastpeft.LoraConfig(r=2, target_modules=["intermediate.dense"]), adapter_name="v")


def test_save_writes_only_the_trained_biases_and_load_is_exact(tmp_path):
    model = bitfit(minilm_classifier())
    train_steps(model, steps=2)
    model.eval()
    fastpeft.save_adapter(model, tmp_path)
    saved = fastpeft.methods.files.read_adapter(tmp_path)
    trained = {PREFIX + k for k, p in model.named_parameters() if p.requires_grad}
    assert set(saved.tensors) == {k.replace("modules_to_save.default.", "") for k in trained}
    assert saved.config["method"] == "bitfit"
    fresh = fastpeft.load_adapter(minilm_classifier(), tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(**minilm_batch()).logits, model(**minilm_batch()).logits)


def test_disable_and_delete_restore_the_initial_biases():
    model = bitfit(minilm_classifier())
    with torch.no_grad():
        plain = minilm_classifier()(**minilm_batch()).logits
    train_steps(model, steps=2)
    model.eval()
    with torch.no_grad():
        trained = model(**minilm_batch()).logits
        with fastpeft.disable_adapters(model):
            assert torch.equal(model(**minilm_batch()).logits, plain)
        assert torch.equal(model(**minilm_batch()).logits, trained)
    fastpeft.delete_adapter(model, "default")
    state = minilm_classifier().state_dict()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_merge_is_refused_and_merge_and_unload_keeps_the_trained_biases():
    model = bitfit(minilm_classifier())
    train_steps(model, steps=2)
    model.eval()
    with torch.no_grad():
        trained = model(**minilm_batch()).logits
    with pytest.raises(ValueError, match="BitFit adapters cannot be merged: they train the model's own bias"):
        fastpeft.merge(model)
    fastpeft.merge_and_unload(model)
    assert not fastpeft.adapter_names(model) and not hasattr(model, "_fastpeft_bitfit_initial")
    with torch.no_grad():
        assert torch.equal(model(**minilm_batch()).logits, trained)


def test_new_zero_biases_on_a_model_without_biases():
    model = tiny_llama()
    with pytest.raises(ValueError, match="LlamaModel has no bias parameters for BitFit to train: give add_biases"):
        fastpeft.inject(model, BitFitConfig())
    fastpeft.inject(model, BitFitConfig(add_biases=["q_proj"]))
    q = model.layers[0].self_attn.q_proj
    assert q.bias.requires_grad and not q.bias.any() and not q.weight.requires_grad
    fastpeft.delete_adapter(model, "default")
    assert q.bias is None and "bias" not in dict(q.named_parameters())


@pytest.mark.parametrize("kwargs, error, message", [
    ({"bias_pattern": "(unclosed"}, ValueError, r"bias_pattern '\(unclosed' is not a valid regex"),
    ({"bias_pattern": ""}, ValueError, "bias_pattern must be a non-empty regex string"),
    ({"bias_pattern": 3}, ValueError, "bias_pattern must be a non-empty regex string .*got 3"),
    ({"add_biases": "q_proj"}, TypeError, "add_biases must be a list of module names, got 'q_proj'"),
    ({"modules_to_save": []}, ValueError, "modules_to_save must be a non-empty list"),
    ({"base_model_name_or_path": 1}, TypeError, "base_model_name_or_path must be a string, got 1"),
])
def test_bad_options_are_errors_naming_the_argument(kwargs, error, message):
    with pytest.raises(error, match=message):
        BitFitConfig(**kwargs)


def test_a_pattern_that_finds_no_bias_lists_the_biases():
    model = minilm_classifier()
    with pytest.raises(ValueError, match=r"bias_pattern='nothing' finds no bias of BertForSequenceClassification; "
                                         r"its biases are e.g. \['bert.embeddings.LayerNorm.bias'"):
        bitfit(model, bias_pattern="nothing")
    assert not fastpeft.adapter_names(model)


def test_the_command_line_builds_the_config():
    from fastpeft.cli import parse_args
    from fastpeft.methods import named
    args = parse_args(["train", "--model", "m", "--data", "d.csv", "--output-dir", "o", "--method", "bitfit",
                       "--bias-pattern", "intermediate"])
    config = named("bitfit").cli_config(args.options, ["classifier"], demo=False)
    assert config == BitFitConfig(bias_pattern="intermediate", modules_to_save=["classifier"])
    assert named("bitfit").describe(config) == "BitFit (the biases matching 'intermediate')"
