"""torch.compile of a whole model with each method injected (diff pruning: its search and its fixed mask): one graph
(fullgraph), the same training step as eager (forward and every trainable gradient, dropout included, with live
adapters: every gradient non-zero), and no recompilation from one step to the next."""
import pytest
import torch

from fastpeft import BottleneckConfig, DiffPruningConfig, LoraConfig, inject, project_to_density
from tests.model_cases import hidden, liven, minilm, minilm_batch
from tests.model_cases import one_thread  # noqa: F401  (autouse fixture)

CONFIGS = {
    "lora": LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["query", "value"]),
    "houlsby": BottleneckConfig(placement="houlsby", bottleneck=8, dropout=0.1),
    "parallel": BottleneckConfig(placement="parallel", bottleneck=8, dropout=0.1, init="near-identity"),
    "diff": DiffPruningConfig(target_modules=["query", "value"], density=0.01),
    "diff_fixed_mask": DiffPruningConfig(target_modules=["query", "value"], density=0.01),  # after projection
}


@pytest.mark.parametrize("method", CONFIGS)
def test_compiled_training_step_matches_eager(method):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, batch = minilm(), minilm_batch()
    inject(model, CONFIGS[method])
    if method == "diff_fixed_mask":  # compiled, the layer merges out of place; eager, it scatters into the weight
        project_to_density(model)
    liven(model)  # LoRA's B = 0 or a zero diff would make the adapter's term and some gradients zero
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # eager kernels: the same random draws

    def step(fn, seed):
        torch.manual_seed(seed)
        out = hidden(fn, batch)
        return out, torch.autograd.grad(out.square().mean(), trainable)

    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in (1, 2):
            got_out, got_grads = step(compiled, seed)
            want_out, want_grads = step(model, seed)
            torch.testing.assert_close(got_out, want_out)
            assert all(want.count_nonzero() > 0 for want in want_grads)
            for got, want in zip(got_grads, want_grads):  # fp32 sums may split differently in the two graphs
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
