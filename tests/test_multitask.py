"""Multi-task heads (fastpeft.methods.multitask): the uncertainty-weighted loss against a hand computation and its
gradients, the task sampler's frequencies, training on MiniLM with three tiny synthetic tasks, composition with LoRA,
bottleneck adapters and prefix tuning (train, save, load), and the errors. The registry contract is in
test_method_contract.py."""
import math

import pytest
import torch
from scipy.stats import chisquare

import fastpeft
from fastpeft.methods.multitask import (MultiTaskConfig, multitask_forward, sampling_probabilities, task_batches,
                                        task_logits, task_loss, task_weights, uncertainty_loss)
from fastpeft.methods.multitask.heads import pool
from tests.model_cases import MINILM_DIR, minilm, one_thread  # noqa: F401  (autouse fixture)

TASKS = {"sentiment": {"kind": "classification", "num_labels": 2}, "score": {"kind": "regression"},
         "ner": {"kind": "token_classification", "num_labels": 3}}


def config(**changes) -> MultiTaskConfig:
    return MultiTaskConfig(**{"tasks": TASKS, "dropout": 0.0, **changes})


def synthetic_batches(seed: int = 0, count: int = 2, size: int = 8, length: int = 10) -> dict[str, list[dict]]:
    """Per task, `count` batches of random token ids (the last two of some rows padded) with labels the encoder can
    tell: sentiment = whether token 1 is in the upper half of the id range, score = the mean id of tokens 1-3 scaled,
    ner = whether each token's id is even."""
    g = torch.Generator().manual_seed(seed)
    tasks = {}
    for task in TASKS:
        tasks[task] = []
        for _ in range(count):
            ids = torch.randint(1000, 3000, (size, length), generator=g)
            mask = torch.ones(size, length, dtype=torch.long)
            mask[::2, -2:] = 0
            ids = ids.masked_fill(mask == 0, 0)
            labels = {"sentiment": (ids[:, 1] >= 2000).long(), "score": (ids[:, 1:4].float().mean(1) - 2000) / 500,
                      "ner": (ids % 2).masked_fill(mask == 0, -100)}[task]
            tasks[task].append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return tasks


# --- the loss ------------------------------------------------------------------------------------------------------
def model_with_heads(log_variances: dict[str, float] | None = None):
    model = fastpeft.inject(minilm(), config())
    with torch.no_grad():
        for task, s in (log_variances or {}).items():
            model.multitask_heads.log_variances[task].fill_(s)
    return model


def test_uncertainty_loss_matches_the_hand_computation():
    model = model_with_heads({"sentiment": 0.3, "score": -0.5, "ner": 1.1})
    losses = {"sentiment": torch.tensor(1.2), "score": torch.tensor(0.7), "ner": torch.tensor(2.0)}
    total, weights = uncertainty_loss(model, losses)
    # classification kinds: exp(-s) L + s; regression: (exp(-s) L + s) / 2 (Kendall et al.'s 1/(2 sigma^2), log sigma)
    by_hand = (math.exp(-0.3) * 1.2 + 0.3) + 0.5 * (math.exp(0.5) * 0.7 - 0.5) + (math.exp(-1.1) * 2.0 + 1.1)
    assert total.item() == pytest.approx(by_hand, rel=1e-6)
    assert {t: w.item() for t, w in weights.items()} == pytest.approx(
        {"sentiment": math.exp(-0.3), "score": math.exp(0.5), "ner": math.exp(-1.1)}, rel=1e-6)
    assert task_weights(model) == pytest.approx({t: w.item() for t, w in weights.items()}, rel=1e-6)
    one, weights = uncertainty_loss(model, {"score": torch.tensor(0.7)})  # a batch of one task
    assert one.item() == pytest.approx(0.5 * (math.exp(0.5) * 0.7 - 0.5), rel=1e-6) and list(weights) == ["score"]


def test_gradients_reach_the_log_variances_and_the_task_losses():
    model = model_with_heads({"sentiment": 0.3, "score": -0.5})
    losses = {"sentiment": torch.tensor(1.2, requires_grad=True), "score": torch.tensor(0.7, requires_grad=True)}
    total, _ = uncertainty_loss(model, losses)
    total.backward()
    s = model.multitask_heads.log_variances
    # d/ds c (exp(-s) L + s) = c (1 - exp(-s) L);  d/dL = c exp(-s)
    assert s["sentiment"].grad.item() == pytest.approx(1 - math.exp(-0.3) * 1.2, rel=1e-6)
    assert s["score"].grad.item() == pytest.approx(0.5 * (1 - math.exp(0.5) * 0.7), rel=1e-6)
    assert s["ner"].grad is None  # not in this step's losses
    assert losses["sentiment"].grad.item() == pytest.approx(math.exp(-0.3), rel=1e-6)
    assert losses["score"].grad.item() == pytest.approx(0.5 * math.exp(0.5), rel=1e-6)


def test_task_losses_and_pooling_leave_out_padding():
    logits = torch.randn(2, 4, 3)
    labels = torch.tensor([[0, 1, 2, 1], [2, -100, 0, 1]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    kept = torch.tensor([[True, True, True, False], [True, False, True, True]])
    expected = torch.nn.functional.cross_entropy(logits[kept], labels[kept])
    torch.testing.assert_close(task_loss("token_classification", logits, labels, mask), expected)
    values = torch.randn(5, 1)
    torch.testing.assert_close(task_loss("regression", values, torch.zeros(5)), values.pow(2).mean())
    hidden = torch.randn(2, 4, 6)
    torch.testing.assert_close(pool(hidden, mask, "mean")[0], hidden[0, :3].mean(0))
    torch.testing.assert_close(pool(hidden, mask, "last"), torch.stack([hidden[0, 2], hidden[1, 3]]))
    torch.testing.assert_close(pool(hidden, mask, "cls"), hidden[:, 0])


# --- the sampler ---------------------------------------------------------------------------------------------------
SIZES = {"big": 60, "medium": 30, "small": 10}


def draw_counts(strategy: str, temperature=None, draws: int = 20000, seed: int = 0) -> list[int]:
    datasets = {task: list(range(n)) for task, n in SIZES.items()}
    tasks = [task for task, _ in task_batches(datasets, strategy, temperature, num_batches=draws, seed=seed)]
    return [tasks.count(task) for task in SIZES]


@pytest.mark.parametrize("strategy, temperature, expected", [
    ("proportional", None, [0.6, 0.3, 0.1]),
    ("temperature", 2.0, [math.sqrt(n) / sum(map(math.sqrt, SIZES.values())) for n in SIZES.values()]),
    ("temperature", 1e6, [1 / 3] * 3),  # a very high temperature is uniform
])
def test_sampling_frequencies_follow_the_strategy(strategy, temperature, expected):
    assert list(sampling_probabilities(SIZES, strategy, temperature).values()) == pytest.approx(expected, rel=1e-5)
    counts = draw_counts(strategy, temperature)
    assert chisquare(counts, [p * sum(counts) for p in expected]).pvalue > 1e-3
    proportional = [p * sum(counts) for p in (0.6, 0.3, 0.1)]  # the test can fail: other frequencies are told apart
    assert strategy == "proportional" or chisquare(counts, proportional).pvalue < 1e-6


def test_sampler_is_seeded_and_takes_each_tasks_batches_in_turn():
    datasets = {"a": ["a0", "a1", "a2"], "b": ["b0"]}
    drawn = list(task_batches(datasets, "temperature", 3.0, num_batches=40, seed=5))
    assert drawn == list(task_batches(datasets, "temperature", 3.0, num_batches=40, seed=5))
    assert drawn != list(task_batches(datasets, "temperature", 3.0, num_batches=40, seed=6))
    a_batches = [batch for task, batch in drawn if task == "a"]
    assert a_batches == [f"a{i % 3}" for i in range(len(a_batches))]  # in order, starting over when used up
    assert all(batch == "b0" for task, batch in drawn if task == "b")
    assert len(list(task_batches(datasets))) == 4  # default: as many as the tasks have together


# --- training on MiniLM --------------------------------------------------------------------------------------------
def evaluate(model, data) -> tuple[dict[str, float], float]:
    """Each task's mean loss over its batches and the uncertainty-weighted total, in eval mode."""
    model.eval()
    with torch.no_grad():
        losses = {task: torch.stack([multitask_forward(model, b, task).loss for b in batches]).mean()
                  for task, batches in data.items()}
        total, _ = uncertainty_loss(model, losses)
    return {task: loss.item() for task, loss in losses.items()}, total.item()


def train(model, data, steps: int, lr: float = 1e-2) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for task, batch in task_batches(data, "temperature", 2.0, num_batches=steps, seed=0):
        total, _ = uncertainty_loss(model, {task: multitask_forward(model, batch, task).loss})
        optimizer.zero_grad()
        total.backward()
        optimizer.step()


def test_training_three_tasks_on_minilm_lowers_the_loss_and_moves_the_log_variances():
    torch.manual_seed(0)
    model = fastpeft.inject(minilm(), config(dropout=0.1))
    trainable = {key for key, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(key.startswith("multitask_heads.") for key in trainable)
    data = synthetic_batches()
    before, total_before = evaluate(model, data)
    train(model, data, steps=36)
    after, total_after = evaluate(model, data)
    assert total_after < total_before - 0.1
    assert all(after[task] < before[task] for task in TASKS), (before, after)
    weights = task_weights(model)
    assert all(abs(math.log(w)) > 0.01 for w in weights.values()), weights  # every s_t has left 0


# --- composition ---------------------------------------------------------------------------------------------------
ENCODER_ADAPTERS = {
    "lora": (lambda: fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]), ".lora_"),
    "bottleneck": (lambda: fastpeft.BottleneckConfig(placement="pfeiffer", bottleneck=8), ".adapter."),
    "prefix_tuning": (lambda: fastpeft.PrefixTuningConfig(num_virtual_tokens=4), "prefix_tuning."),
}


def logits_of(model, data) -> dict[str, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        return {task: multitask_forward(model, batches[0], task).logits for task, batches in data.items()}


@pytest.mark.parametrize("adapter", list(ENCODER_ADAPTERS))
def test_composes_with_an_encoder_adapter_trains_saves_and_loads(tmp_path, adapter):
    make, marker = ENCODER_ADAPTERS[adapter]
    torch.manual_seed(0)
    model = fastpeft.inject(minilm(), make(), adapter_name="encoder")
    fastpeft.inject(model, config(), adapter_name="tasks")
    assert fastpeft.active_adapters(model) == ["encoder", "tasks"]
    trainable = {key for key, p in model.named_parameters() if p.requires_grad}
    assert trainable == {key for key in trainable if marker in key or key.startswith("multitask_heads.")}
    assert any(marker in key for key in trainable) and "multitask_heads.log_variances.score" in trainable
    data = synthetic_batches(count=1)
    adapter_before = {k: v.clone() for k, v in model.state_dict().items() if marker in k}
    train(model, data, steps=3)
    assert any(not torch.equal(model.state_dict()[k], v) for k, v in adapter_before.items())  # the encoder's trained
    for name in ("encoder", "tasks"):
        fastpeft.save_adapter(model, tmp_path / name, adapter_name=name)
    fresh = minilm()
    for name in ("tasks", "encoder"):  # either order
        fastpeft.load_adapter(fresh, tmp_path / name, adapter_name=name)
    expected = logits_of(model, data)
    assert all(torch.equal(got, expected[task]) for task, got in logits_of(fresh, data).items())
    assert task_weights(fresh) == task_weights(model)
    assert fastpeft.adapter_config(fresh, "tasks").tasks == config().tasks


def test_merge_is_refused_merge_and_unload_keeps_the_heads_and_delete_removes_them():
    model = fastpeft.inject(minilm(), fastpeft.LoraConfig(r=4, target_modules=["query"]), adapter_name="encoder")
    fastpeft.inject(model, config(), adapter_name="tasks")
    with pytest.raises(ValueError, match="multi-task heads cannot be merged"):
        fastpeft.merge(model)
    data = synthetic_batches(count=1)
    with fastpeft.disable_adapters(model):  # LoRA off; the heads still answer, on the base encoder
        base_logits = logits_of(model, data)
    fastpeft.delete_adapter(model, "encoder")
    assert all(torch.equal(got, base_logits[task]) for task, got in logits_of(model, data).items())
    fastpeft.delete_adapter(model, "tasks")
    assert not hasattr(model, "multitask_heads")
    with pytest.raises(ValueError, match="has no multi-task heads"):
        multitask_forward(model, data["score"][0], "score")
    model = fastpeft.inject(minilm(), fastpeft.LoraConfig(r=4, target_modules=["query"]), adapter_name="encoder")
    fastpeft.inject(model, config(), adapter_name="tasks")
    before = logits_of(model, data)
    fastpeft.merge_and_unload(model)
    assert not fastpeft.adapter_names(model) and hasattr(model, "multitask_heads")
    for task, got in logits_of(model, data).items():
        torch.testing.assert_close(got, before[task], rtol=1e-4, atol=1e-5)


# --- errors --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tasks, message", [
    ({}, "tasks must be a non-empty dict"),
    (None, "tasks must be a non-empty dict"),
    ({"a": {"kind": "ranking", "num_labels": 2}}, r"tasks\['a'\]\['kind'\] must be one of .*got 'ranking'"),
    ({"a": {"kind": "classification", "num_labels": 0}}, r"tasks\['a'\]\['num_labels'\] must be an int >= 1, got 0"),
    ({"a": {"kind": "classification"}}, r"tasks\['a'\]\['num_labels'\] is required for kind 'classification'"),
    ({"a": {"kind": "regression", "labels": 2}}, r"tasks\['a'\] must be a dict with keys \('kind', 'num_labels'\)"),
    ({"a.b": {"kind": "regression"}}, "task names must be non-empty strings without '.', got 'a.b'"),
])
def test_bad_configs_are_errors_naming_the_setting(tasks, message):
    with pytest.raises(ValueError, match=message):
        MultiTaskConfig(tasks=tasks)


def test_bad_calls_are_clear_errors():
    model = fastpeft.inject(minilm(), config())
    batch = synthetic_batches(count=1)["sentiment"][0]
    with pytest.raises(ValueError, match=r"unknown task 'topic'; the model's multi-task heads are \['sentiment', "
                                         r"'score', 'ner'\]"):
        multitask_forward(model, batch, "topic")
    with pytest.raises(ValueError, match="unknown task 'topic'"):
        uncertainty_loss(model, {"topic": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="unknown task 'topic'"):
        task_logits(model, "topic", torch.zeros(1, 2, 384))
    with pytest.raises(ValueError, match=r"losses\['score'\] must be a scalar tensor, got \(2,\)"):
        uncertainty_loss(model, {"score": torch.ones(2)})
    with pytest.raises(ValueError, match=r"regression labels must have shape \(8, 1\)"):
        multitask_forward(model, {**batch, "labels": torch.zeros(8, 2)}, "score")
    with pytest.raises(ValueError, match="already has multi-task heads adapter 'default'"):
        fastpeft.inject(model, config(), adapter_name="second")
    with pytest.raises(ValueError, match="strategy must be one of"):
        task_batches({"a": [1]}, strategy="uniform")
    with pytest.raises(ValueError, match="temperature must be a finite number > 0.*got 0"):
        task_batches({"a": [1]}, strategy="temperature", temperature=0)
    with pytest.raises(ValueError, match="temperature applies to strategy='temperature' only"):
        task_batches({"a": [1]}, temperature=2.0)
    with pytest.raises(ValueError, match=r"datasets\['b'\] has no batches"):
        task_batches({"a": [1], "b": []})
