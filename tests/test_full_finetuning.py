"""Full fine-tuning on MiniLM: every parameter trains and the loss falls; the initial model is kept on the CPU and
comes back bit for bit on delete and inside disable_adapters; the file holds every parameter and loads exactly;
merge is refused with the reason while merge_and_unload keeps the trained model; no other method fits beside it."""
import copy
import functools

import pytest
import torch

import fastpeft
from fastpeft.methods.files import PREFIX, read_adapter
from fastpeft.methods.full_finetuning import FullFinetuningConfig
from tests.model_cases import hidden, minilm, minilm_batch
from tests.model_cases import one_thread  # noqa: F401  (autouse fixture)


def objective(model) -> torch.Tensor:
    """Pull the first token's features towards a fixed target: a loss any encoder can lower."""
    target = torch.linspace(-1, 1, 384)
    return (hidden(model, minilm_batch())[:, 0] - target).pow(2).mean()


@functools.cache
def _trained():
    model = fastpeft.inject(minilm(), FullFinetuningConfig())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    losses = []
    for _ in range(3):
        loss = objective(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return model.eval(), losses


def trained_model():
    """A copy of the model trained for 3 steps (trained once), and its losses."""
    model, losses = _trained()
    return copy.deepcopy(model), losses


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(the trained model, the directory it is saved in): a whole model's file, written once."""
    model, _ = _trained()
    directory = tmp_path_factory.mktemp("full")
    fastpeft.save_adapter(model, directory)
    return model, directory


def test_every_parameter_trains_and_the_loss_falls():
    model, losses = trained_model()
    assert losses[-1] < losses[0]
    assert all(p.requires_grad for p in model.parameters())
    initial = dict(minilm().named_parameters())
    changed = [k for k, p in model.named_parameters() if not torch.equal(p, initial[k])]
    assert len(changed) > 0.9 * len(initial)
    copies = model._fastpeft_full_finetuning_initial["default"].initial
    assert copies.keys() == initial.keys() and all(v.device.type == "cpu" for v in copies.values())


def test_disable_and_delete_bring_back_the_initial_model():
    plain = minilm()
    with torch.no_grad():
        expected = hidden(plain, minilm_batch())
    model, _ = trained_model()
    with torch.no_grad():
        trained = hidden(model, minilm_batch())
        with fastpeft.disable_adapters(model):
            assert torch.equal(hidden(model, minilm_batch()), expected)
        assert torch.equal(hidden(model, minilm_batch()), trained)
    fastpeft.delete_adapter(model, "default")
    state = plain.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not hasattr(model, "_fastpeft_full_finetuning_initial")


def test_the_file_holds_every_parameter_and_loads_exactly(saved):
    model, directory = saved
    file = read_adapter(directory)
    assert set(file.tensors) == {PREFIX + k for k, _ in model.named_parameters()}
    assert file.config == {"method": "full_finetuning", "modules_to_save": None,
                            "base_model_name_or_path": model.name_or_path}
    fresh = fastpeft.load_adapter(minilm(), directory)
    assert all(torch.equal(p, model.get_parameter(k)) for k, p in fresh.named_parameters())


def test_a_file_of_another_model_is_refused_naming_the_keys(saved):
    other = minilm()
    other.encoder.layer = other.encoder.layer[:5]
    with pytest.raises(ValueError, match=r"does not fit the full fine-tuning adapter of BertModel:\n  unexpected keys "
                                         r"\(16\): base_model.model.encoder.layer.5"):
        fastpeft.load_adapter(other, saved[1])
    assert not fastpeft.adapter_names(other)


def test_merge_is_refused_and_merge_and_unload_keeps_the_trained_model():
    model, _ = trained_model()
    with torch.no_grad():
        trained = hidden(model, minilm_batch())
    with pytest.raises(ValueError, match="full fine-tuning cannot be merged: it trains every parameter in place"):
        fastpeft.merge(model)
    fastpeft.merge_and_unload(model)
    assert not fastpeft.adapter_names(model) and not hasattr(model, "_fastpeft_full_finetuning_initial")
    with torch.no_grad():
        assert torch.equal(hidden(model, minilm_batch()), trained)


def test_no_other_method_fits_beside_it():
    model = fastpeft.inject(minilm(), FullFinetuningConfig())
    with pytest.raises(ValueError, match="LoRA adapter 'lora' would adapt 'encoder.layer.0.attention.self.query', "
                                         "where full fine-tuning adapter 'default' sits"):
        fastpeft.inject(model, fastpeft.LoraConfig(r=2, target_modules=["query"]), adapter_name="lora")


@pytest.mark.parametrize("kwargs, error, message", [
    ({"modules_to_save": "classifier"}, TypeError, "modules_to_save must be a list of module names"),
    ({"base_model_name_or_path": 1}, TypeError, "base_model_name_or_path must be a string, got 1"),
])
def test_bad_options_are_errors_naming_the_argument(kwargs, error, message):
    with pytest.raises(error, match=message):
        FullFinetuningConfig(**kwargs)


def test_a_saved_config_with_unknown_settings_is_refused():
    with pytest.raises(ValueError, match=r"x.json: unknown full fine-tuning settings \['r'\]"):
        FullFinetuningConfig.from_dict({"method": "full_finetuning", "r": 8}, source="x.json")
