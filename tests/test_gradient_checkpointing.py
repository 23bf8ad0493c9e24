"""Gradient checkpointing on MiniLM, reentrant or not, gives the gradients of the same step without it, dropout on:
the recomputed forward must draw again the forward's dropout seeds (and the diff search's gate noise), which it
does when they come from torch's generator, whose state torch.utils.checkpoint restores for the recompute."""
import warnings

import pytest
import torch

from fastpeft import inject, project_to_density
from tests.model_cases import fused_method_configs, hidden, liven, minilm, minilm_batch
from tests.model_cases import one_thread  # noqa: F401  (autouse fixture)

CONFIGS = fused_method_configs(["query", "value"])


def _gradients(model, batch, recomputed: list) -> list:
    """Every trainable gradient of one step under dropout seed 1; `recomputed` gets how often the first layer's
    attention ran (the checkpoint wraps the layer's forward, which its own hooks would count once)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    calls = []
    hook = model.encoder.layer[0].attention.register_forward_hook(lambda *_: calls.append(1))
    torch.manual_seed(1)
    hidden(model, batch).square().mean().backward()  # reentrant checkpointing supports .backward() only
    hook.remove()
    recomputed.append(len(calls))
    grads = [p.grad for p in trainable]
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("backend", ["torch", "ext"])
@pytest.mark.parametrize("method", CONFIGS)
def test_checkpointed_gradients_match_plain_ones(method, backend, monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", backend)
    torch.manual_seed(0)
    model, batch = minilm(), minilm_batch()
    inject(model, CONFIGS[method])
    liven(model)  # LoRA's B = 0 or a zero diff would hide the adapter's term, its dropout and some gradients
    if method == "diff-fixed-mask":
        project_to_density(model)  # keeps the largest entries of the live diff
    model.train()
    calls = []
    plain = _gradients(model, batch, calls)
    assert all(g.count_nonzero() > 0 for g in plain)
    for reentrant in (True, False):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers 5.25 renames it activation_checkpointing_*
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            checkpointed = _gradients(model, batch, calls)
            model.gradient_checkpointing_disable()
        for got, want in zip(checkpointed, plain):
            torch.testing.assert_close(got, want, msg=lambda m, r=reentrant: f"use_reentrant={r}: {m}")
    assert calls == [1, 2, 2]  # each checkpointed step ran the layer's forward again in backward
