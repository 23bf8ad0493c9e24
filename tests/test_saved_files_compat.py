"""Adapter files saved by an earlier fastpeft (commit f0eeef4, see tests/data/saved_by_f0eeef4/make.py) still load
into the same tiny base models and give the outputs they gave then."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model

import fastpeft

DATA = Path(__file__).resolve().parent / "data" / "saved_by_f0eeef4"
INPUT = torch.arange(14).reshape(2, 7) % 100


def tiny_bert():
    return BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                vocab_size=100, max_position_embeddings=32), add_pooling_layer=False).eval()


def tiny_gpt2():
    return GPT2Model(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32)).eval()


@pytest.mark.parametrize("method, make", [("lora", tiny_gpt2), ("bottleneck", tiny_bert),
                                          ("diff_pruning", tiny_gpt2)])
def test_files_of_the_earlier_format_load_with_their_outputs(method, make):
    folder = DATA / method
    model = make()
    model.load_state_dict(load_file(folder / "base.safetensors"))
    fastpeft.load_adapter(model, folder / "adapter")
    with torch.no_grad():
        hidden = model(input_ids=INPUT).last_hidden_state
    torch.testing.assert_close(hidden, load_file(folder / "expected.safetensors")["hidden"], rtol=1e-5, atol=1e-6)
