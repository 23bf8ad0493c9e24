"""A LoRA MiniLM under the stock transformers.Trainer with fastpeft's AdapterCheckpoints callback: every checkpoint
holds the adapter in fastpeft's files and no copy of the frozen base model, and a run resumed from a checkpoint ends
where the uninterrupted run ends (dropout on, so Trainer's restored RNG state is part of it)."""
import json
import os

import pytest
import torch
from transformers import Trainer, TrainingArguments

import fastpeft
from fastpeft.hf_trainer import AdapterCheckpoints
from tests.model_cases import minilm_classifier
from tests.model_cases import one_thread  # noqa: F401  (autouse fixture)

STEPS, SAVE_EVERY, BATCH = 4, 2, 4


def lora_model():
    model = minilm_classifier(2)
    torch.manual_seed(0)
    return fastpeft.inject(model, fastpeft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                                      target_modules=["query", "value"],
                                                      modules_to_save=["classifier"]))


def examples() -> list[dict]:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1000, 20000, (STEPS * BATCH, 10), generator=g)
    labels = torch.randint(0, 2, (STEPS * BATCH,), generator=g)
    return [{"input_ids": i, "labels": y} for i, y in zip(ids, labels)]


def run(output_dir, resume_from=None):
    """The model after STEPS Trainer steps (checkpoints every SAVE_EVERY), resumed from `resume_from` if given."""
    model = lora_model()
    args = TrainingArguments(output_dir=str(output_dir), max_steps=STEPS, save_steps=SAVE_EVERY,
                             per_device_train_batch_size=BATCH, learning_rate=1e-2, seed=0, use_cpu=True,
                             report_to="none", disable_tqdm=True, logging_strategy="no")
    Trainer(model=model, args=args, train_dataset=examples(), callbacks=[AdapterCheckpoints()]).train(
        resume_from_checkpoint=resume_from and str(resume_from))
    return model


def trainable(model) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """(output directory, model) of the run without interruption, on one thread as the resumed run (bit-exactness)."""
    output, threads = tmp_path_factory.mktemp("uninterrupted"), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return output, run(output)
    finally:
        torch.set_num_threads(threads)


def test_checkpoints_hold_the_adapter_and_no_base_model(uninterrupted):
    output, model = uninterrupted
    for step in range(SAVE_EVERY, STEPS + 1, SAVE_EVERY):
        checkpoint = output / f"checkpoint-{step}"
        assert json.loads((checkpoint / "adapter_config.json").read_text())["peft_type"] == "LORA"
        assert os.path.getsize(checkpoint / "model.safetensors") < 1e6  # the trainable tensors; the model is 90 MB
    loaded = fastpeft.load_adapter(minilm_classifier(2), output / f"checkpoint-{STEPS}")
    for name, value in trainable(model).items():
        assert torch.equal(dict(loaded.named_parameters())[name], value), name
    assert model._keys_to_ignore_on_save == minilm_classifier(2)._keys_to_ignore_on_save  # given back at the end


def test_resumed_run_ends_where_the_uninterrupted_run_ends(uninterrupted, tmp_path):
    output, model = uninterrupted
    resumed = run(tmp_path, resume_from=output / f"checkpoint-{SAVE_EVERY}")
    for name, value in trainable(resumed).items():  # not checkpoint-2's values: those differ from the final ones
        assert torch.equal(value, trainable(model)[name]), name
