"""MiniLM trains under torch.autocast("cpu", bfloat16) with each fused method: the loss is finite and falls over a
few AdamW steps, and every fp32 trainable parameter gets an fp32 gradient, non-zero once the adapter is live. The
targets include layers fed by bf16 activations (attention output, FFN output), where fp32 weights meet bf16 inputs.
On the default backend only: bf16 GEMMs are slow on CPUs without bf16 units, and test_autocast.py checks the
autocast entry that every backend shares, on each of them."""
import pytest
import torch

from fastpeft import inject, project_to_density
from tests.model_cases import fused_method_configs, minilm_batch, minilm_classifier
from tests.model_cases import one_thread  # noqa: F401  (autouse fixture)

CONFIGS = fused_method_configs(["query", "output.dense"])
STEPS = 3


@pytest.mark.parametrize("method", CONFIGS)
def test_bf16_autocast_training_steps(method):
    model, batch, labels = minilm_classifier(), minilm_batch(), torch.tensor([0, 1])
    inject(model, CONFIGS[method])
    if method == "diff-fixed-mask":
        project_to_density(model)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {p.dtype for p in trainable} == {torch.float32}
    optimizer = torch.optim.AdamW(trainable, lr=3e-3)
    losses = []
    for _ in range(STEPS):
        torch.manual_seed(0)  # the same dropout masks each step: the loss moves only with the parameters
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch, labels=labels).loss
        loss.backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable)
        live = all(p.grad.count_nonzero() > 0 for p in trainable)  # LoRA's A and the search's gates: from step 2
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert live
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses
