"""Frozen features on MiniLM with a classifier head: the encoder runs in eval mode (no dropout) and under no_grad
even in a training step, so autograd saves next to nothing and no encoder parameter gets a gradient; the head
learns; the opt-in cache runs the encoder once per repeated batch; save / load covers the head alone; merge is
refused with the reason; bad options are errors naming the argument."""

import pytest
import torch

import fastpeft
from fastpeft.methods.files import PREFIX, read_adapter
from fastpeft.methods.frozen_features import FrozenFeaturesConfig
from fastpeft.methods.frozen_features.frozen import FrozenFeatures, frozen_layers
from fastpeft.training import saved_activation_bytes
from tests.model_cases import minilm, minilm_batch, minilm_classifier
from tests.model_cases import one_thread  # noqa: F401  (autouse fixture)


def classifier(**kwargs):
    return fastpeft.inject(minilm_classifier(), FrozenFeaturesConfig(modules_to_save=["classifier"], **kwargs))


BATCH = {**minilm_batch(), "labels": torch.tensor([0, 1])}


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**minilm_batch()).logits


def test_the_encoder_is_frozen_in_eval_mode_and_only_the_head_trains():
    model = classifier()
    assert [path for path, _ in frozen_layers(model)] == ["bert"]
    model.train()
    assert model.bert.training and not any(m.training for m in model.bert.base_layer.modules())
    assert model.dropout.training  # the head's own dropout is the head's
    frozen = {k: p.detach().clone() for k, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(8):
        loss = model(**BATCH).loss
        loss.backward()
        assert all(p.grad is None for p in model.bert.parameters())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    after = dict(model.named_parameters())
    assert all(torch.equal(after[k], v) for k, v in frozen.items())


def test_autograd_keeps_only_the_head_input():
    """Nothing of the encoder is saved for backward, only the head's input [2, 384] (where training the encoder
    keeps megabytes)."""
    frozen_bytes = saved_activation_bytes(classifier(), BATCH)
    assert frozen_bytes < 2 * 384 * 4 + 64
    assert saved_activation_bytes(minilm_classifier(), BATCH) > 1000 * frozen_bytes


def test_a_head_below_a_frozen_part_still_gets_its_gradient():
    model = fastpeft.inject(minilm(), FrozenFeaturesConfig(modules_to_save=["encoder.layer.4"]))
    below, above = [f"encoder.layer.{i}" for i in range(4)], ["encoder.layer.5", "pooler"]
    assert [path for path, _ in frozen_layers(model)] == ["embeddings", *below, *above]
    model(**minilm_batch()).last_hidden_state.sum().backward()
    head = [p for p in model.parameters() if p.requires_grad]
    assert head and all(p.grad is not None for p in head)
    assert all(p.grad is None for p in model.encoder.layer[5].parameters())  # ran with autograd, still frozen


def test_the_cache_runs_the_encoder_once_per_repeated_input():
    model = classifier(cache_size=2)
    cache = model.bert.cache
    with torch.inference_mode():  # an evaluation fills the cache; training reads it below
        first = model(**minilm_batch()).logits
    model.train()
    loss = model(**BATCH).loss
    loss.backward()  # cached features are ordinary tensors the head can save for its backward
    assert (cache.hits, cache.misses) == (1, 1)
    assert model.classifier.modules_to_save["default"].weight.grad is not None
    model.eval()
    assert torch.equal(logits(model), first) and (cache.hits, cache.misses) == (2, 1)
    model.bert(**minilm_batch()).last_hidden_state.zero_()  # a miss (called otherwise), then changed by the caller
    assert model.bert(**minilm_batch()).last_hidden_state.abs().sum() > 0  # a hit: the cache kept its own copy
    assert (cache.hits, cache.misses) == (3, 2) and len(cache.entries) == 2
    model(input_ids=minilm_batch()["input_ids"][:, :3])
    assert len(cache.entries) == 2 and cache.misses == 3  # the least recently used entry went


def test_save_writes_the_head_alone_and_load_is_exact(tmp_path):
    model = classifier()
    with torch.no_grad():
        model.classifier.modules_to_save["default"].weight.add_(0.5)
    fastpeft.save_adapter(model, tmp_path)
    saved = read_adapter(tmp_path)
    assert set(saved.tensors) == {PREFIX + "classifier.weight", PREFIX + "classifier.bias"}
    assert saved.config["modules_to_save"] == ["classifier"] and saved.config["cache_size"] == 0
    fresh = fastpeft.load_adapter(minilm_classifier(), tmp_path)
    assert torch.equal(logits(fresh), logits(model))


def test_disable_and_delete_give_the_plain_model_back():
    model = classifier()
    with torch.no_grad():
        model.classifier.modules_to_save["default"].weight.add_(0.5)
    trained = logits(model)
    with fastpeft.disable_adapters(model):
        assert torch.equal(logits(model), logits(minilm_classifier()))
        model.train()
        assert model.bert.base_layer.training  # disabled: the plain model, dropout and all
    model.eval()
    assert torch.equal(logits(model), trained)
    fastpeft.delete_adapter(model, "default")
    assert not any(isinstance(m, FrozenFeatures) for m in model.modules())
    assert [n for n, _ in model.named_modules()] == [n for n, _ in minilm_classifier().named_modules()]


def test_merge_is_refused_and_merge_and_unload_puts_the_trained_head_in_place():
    model = classifier()
    with torch.no_grad():
        model.classifier.modules_to_save["default"].weight.add_(0.5)
    trained = logits(model)
    with pytest.raises(ValueError, match="frozen-features adapters cannot be merged: they change no weight"):
        fastpeft.merge(model)
    fastpeft.merge_and_unload(model)
    assert type(model.bert).__name__ == "BertModel" and type(model.classifier) is torch.nn.Linear
    assert torch.equal(logits(model), trained)


@pytest.mark.parametrize("kwargs, error, message", [
    ({}, ValueError, r"modules_to_save is required: the heads that train on the frozen features, e.g. \['classif"),
    ({"modules_to_save": "classifier"}, TypeError, "modules_to_save must be a list of module names"),
    ({"modules_to_save": ["classifier"], "cache_size": -1}, ValueError, "cache_size must be an int >= 0 .*got -1"),
    ({"modules_to_save": ["classifier"], "cache_size": True}, ValueError, "cache_size must be an int >= 0 .*got True"),
])
def test_bad_options_are_errors_naming_the_argument(kwargs, error, message):
    with pytest.raises(error, match=message):
        FrozenFeaturesConfig(**kwargs)


def test_heads_that_do_not_fit_the_model_are_refused():
    with pytest.raises(ValueError, match=r"modules_to_save=\['head'\] matches no module of BertModel"):
        fastpeft.inject(minilm(), FrozenFeaturesConfig(modules_to_save=["head"]))
    with pytest.raises(ValueError, match=r"modules_to_save=\['embeddings', 'encoder', 'pooler'\] leaves nothing "
                                         "of BertModel to freeze"):
        fastpeft.inject(minilm(), FrozenFeaturesConfig(modules_to_save=["embeddings", "encoder", "pooler"]))
