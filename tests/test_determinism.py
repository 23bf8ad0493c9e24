"""The same seed on the same machine gives a bit-identical short training run (every loss, and the saved adapter's
bytes) for every registered method on the `ext` and `torch` backends, with dropout on where the method has it: the
dropout masks come from the seed, and no kernel sums in an order that varies from run to run."""
import dataclasses

import pytest
import torch

import fastpeft
from fastpeft import methods
from fastpeft.methods.multitask import multitask_forward
from tests.model_cases import one_thread  # noqa: F401  (autouse fixture)
from tests.test_method_contract import CASES, INPUT, tiny_bert

DROPOUT = 0.25
STEPS = 3


def with_dropout(config):
    """`config` with each of its dropout settings (LoRA's lora_dropout, an adapter's or a head's dropout) on."""
    return dataclasses.replace(config, **{f.name: DROPOUT for f in dataclasses.fields(config) if "dropout" in f.name})


def loss(model, name: str) -> torch.Tensor:
    """A loss every trainable parameter feeds: the encoder's output, and for multi-task learning each task's head."""
    if name == "multitask":
        return sum(multitask_forward(model, {"input_ids": INPUT}, task).logits.square().mean() for task in "abt")
    return model(input_ids=INPUT).last_hidden_state.square().mean()


def short_run(name: str, directory, seed: int = 0) -> list[float]:
    """STEPS AdamW steps in train mode from `seed`; saves the adapter to `directory`, returns the losses."""
    model = tiny_bert()
    torch.manual_seed(seed)  # the adapter's init, every dropout mask, BERT's own dropout
    fastpeft.inject(model, with_dropout(CASES[name].config("bert"))).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        value = loss(model, name)
        value.backward()
        optimizer.step()
        losses.append(value.item())
    CASES[name].ready(model)
    fastpeft.save_adapter(model, directory)
    return losses


@pytest.mark.parametrize("backend", ["ext", "torch"])
@pytest.mark.parametrize("name", methods.names())
def test_same_seed_same_run(tmp_path, monkeypatch, name, backend):
    monkeypatch.setenv("FASTPEFT_BACKEND", backend)
    first, again = short_run(name, tmp_path / "first"), short_run(name, tmp_path / "again")
    assert first == again, "losses differ between two runs from one seed"
    for file in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "first" / file).read_bytes() == (tmp_path / "again" / file).read_bytes(), file
