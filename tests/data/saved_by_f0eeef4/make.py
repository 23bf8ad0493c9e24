"""Made the adapter files beside this script with fastpeft at commit f0eeef4 (the file formats before the methods
moved into fastpeft/methods/), so that tests/test_saved_files_compat.py can check that they still load:

    git worktree add /tmp/old f0eeef4 && rm /tmp/old/kernels/__init__.py
    FASTPEFT_BACKEND=torch FASTPEFT_NO_EXT=1 PYTHONPATH=/tmp/old python tests/data/saved_by_f0eeef4/make.py

Each folder holds the tiny base model's weights (base.safetensors), the saved adapter, and the output of the model
with the adapter (expected.safetensors)."""
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model

import fastpeft

HERE = Path(__file__).resolve().parent


def tiny_bert():
    torch.manual_seed(0)
    return BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                vocab_size=100, max_position_embeddings=32), add_pooling_layer=False).eval()


def tiny_gpt2():
    torch.manual_seed(0)
    return GPT2Model(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32)).eval()


INPUT = torch.arange(14).reshape(2, 7) % 100


def save(name, model, base_state):
    folder = HERE / name
    fastpeft.save_adapter(model, folder / "adapter")
    save_file({k: v.contiguous() for k, v in base_state.items()}, folder / "base.safetensors")
    with torch.no_grad():
        save_file({"hidden": model(input_ids=INPUT).last_hidden_state.contiguous()}, folder / "expected.safetensors")


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def main():
    print("fastpeft from", fastpeft.__file__, file=sys.stderr)
    model = tiny_gpt2()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    fastpeft.inject(model, fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"]))
    randomize(model, 1)
    save("lora", model, base)

    model = tiny_bert()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    fastpeft.inject(model, fastpeft.AdapterConfig(placement="houlsby", bottleneck=4))
    randomize(model, 2)
    save("bottleneck", model, base)

    model = tiny_gpt2()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    fastpeft.inject(model, fastpeft.DiffPruningConfig(target_modules=["c_fc"], density=0.05))
    randomize(model, 3)
    fastpeft.project_to_density(model)
    randomize(model, 4)
    model(input_ids=INPUT)  # the fixed-mask layers write trained values into the weight on the next forward
    save("diff_pruning", model, base)


if __name__ == "__main__":
    main()
