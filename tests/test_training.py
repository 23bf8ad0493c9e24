"""The training loop and its measurements: a short LoRA run on the demo data must beat the untrained head."""
from types import SimpleNamespace

import pytest
import torch
import transformers
from torch import nn

from fastpeft import training
from fastpeft.datasets import LabelledText, demo_dataset
from fastpeft.demo import packaged_model_dir
from fastpeft import LoraConfig, inject


@pytest.fixture(scope="module")
def minilm_and_data():
    transformers.logging.set_verbosity_error()
    train, test = demo_dataset()
    transformers.set_seed(0)
    model, tokenizer = training.load_classifier(packaged_model_dir(), train.label_names)
    encode = training.EncodedText
    return model, encode(tokenizer, train.subset(range(160)), max_length=64), encode(tokenizer, test, max_length=64)


def test_short_lora_run_beats_the_untrained_head(minilm_and_data):
    model, train, test = minilm_and_data
    before, _ = training.evaluate(model, test)
    inject(model, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"]))
    result = training.train(model, train, epochs=2, lr=5e-3, batch_size=16, progress=False)  # 20 steps
    after, logits = training.evaluate(model, test)
    assert logits.shape == (len(test), 2)
    assert len(result.losses) == len(result.step_ms) == 20 and result.median_step_ms() > 0
    assert after >= before + 0.15, (before, after)


def test_batches_are_padded_per_batch(minilm_and_data):
    _, train, _ = minilm_and_data
    batches = train.batches(4)
    widths = {b["input_ids"].shape[1] for b in batches}
    assert len(widths) > 1  # not padded to one global length
    for b in batches:
        assert b["attention_mask"][:, -1].any()  # the longest row of each batch fills it
    assert sum(len(b["labels"]) for b in batches) == len(train)
    shuffled = torch.cat([b["labels"] for b in train.batches(4, shuffle_seed=1)])
    assert sorted(shuffled.tolist()) == sorted(train.labels.tolist())


def test_empty_data_and_no_steps_are_clear_errors(minilm_and_data):
    tokenizer = minilm_and_data[1].collate.tokenizer
    with pytest.raises(ValueError, match="no examples to encode"):
        training.EncodedText(tokenizer, LabelledText([], [], ["neg", "pos"]))
    with pytest.raises(ValueError, match="no training step was timed"):
        training.TrainResult().median_step_ms()


class TwoBranches(nn.Module):
    """loss = sum(relu(x A^T) + relu(x B^T)): x is saved twice (one storage), the two relu outputs once each."""

    def __init__(self, frozen_a: bool = False):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8, bias=False), nn.Linear(4, 8, bias=False)
        self.a.weight.requires_grad_(not frozen_a)

    def forward(self, x):
        return SimpleNamespace(loss=(torch.relu(self.a(x)) + torch.relu(self.b(x))).sum())


def test_saved_activation_bytes_counts_each_storage_once():
    x = torch.randn(3, 4)
    assert training.saved_activation_bytes(TwoBranches(), {"x": x}) == x.nbytes + 2 * (3 * 8 * 4)


def test_saved_activation_bytes_leaves_out_parameters():
    x = torch.randn(3, 4, requires_grad=True)  # now the weights are saved too, for the gradient of x
    assert training.saved_activation_bytes(TwoBranches(frozen_a=True), {"x": x}) == x.nbytes + 2 * (3 * 8 * 4)


def test_step_times_runs_every_model_on_the_same_batches():
    models = {"one": TwoBranches(), "two": TwoBranches()}
    calls = {name: 0 for name in models}
    for name, m in models.items():
        m.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    ms = training.step_times(models, [transformers.BatchEncoding({"x": torch.randn(3, 4)}) for _ in range(5)], warmup=2)
    assert calls == {"one": 5, "two": 5} and all(t > 0 for t in ms.values())
