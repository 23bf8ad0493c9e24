"""Bad input across the public surface (ops, modules, configs, inject, save / load, merge, the command line): each
call raises ValueError / TypeError / FileNotFoundError (the CLI: a usage error, exit status 2) whose message names the
argument, what was expected and what was given, and leaves every model it touched bit-identical (parameters and
buffers) and every file under tmp_path as it was (DESIGN.md "Errors")."""
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2Model

from fastpeft import (BottleneckAdapter, BottleneckConfig, DiffPruningConfig, LoraConfig, LoraLinear,
                      PromptTuningConfig, SparseDeltaLinear, delete_adapter, inject, load_adapter, merge, save_adapter,
                      set_adapter, unmerge)
from fastpeft.cli import main
from fastpeft.demo import packaged_model_dir
from fastpeft.methods.lora.targets import lora_layers
from fastpeft.ops.adapter import bottleneck_adapter
from fastpeft.ops.lora import lora_linear
from fastpeft.ops.sparse_delta import scatter_delta_, sddmm, sparse_delta_linear
from tests.model_cases import assert_unchanged, minilm, randomize_adapter, snapshot, tiny_gpt2
from tests.model_cases import one_thread  # noqa: F401  (autouse fixture)
from tests.test_adapter_files import set_config
from tests.test_adapter_io import rewrite

LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"])
BOTTLENECK = BottleneckConfig(bottleneck=4)
A0 = "base_model.model.h.0.attn.c_attn.lora_A.weight"


class World:
    """What one case's call may touch: the models it was given (checked bit for bit afterwards) and tmp_path."""

    def __init__(self, tmp_path):
        self.tmp, self.models = tmp_path, []

    def keep(self, model):
        self.models.append(model)
        return model

    def gpt2(self):
        return self.keep(tiny_gpt2())

    def lora(self, config=LORA, merged=False):
        """tiny GPT-2 with a random LoRA adapter 'default' (merged into the weights if asked)."""
        model = inject(tiny_gpt2(), config)
        randomize_adapter(model, seed=1)
        return self.keep(merge(model) if merged else model)

    def saved(self, damage: Callable[[Path], None] = lambda directory: None, model=None, name="adapter") -> Path:
        """An adapter directory saved from `model` (default: a LoRA GPT-2), then `damage`d."""
        directory = self.tmp / name
        save_adapter(model if model is not None else inject(tiny_gpt2(), LORA), directory)
        damage(directory)
        return directory

    def files(self) -> dict[str, bytes]:
        """Every path under tmp_path with its bytes."""
        return {str(p.relative_to(self.tmp)): p.read_bytes() if p.is_file() else b"<dir>" for p in self.tmp.rglob("*")}


# --- damages done to a saved adapter directory ----------------------------------------------------------------------
def set_weight(key, value):
    """The first entry of the weights file's tensor `key` set to `value`."""
    return lambda directory: rewrite(directory, lambda tensors: tensors[key].view(-1).__setitem__(0, value))


def rename_keys(old, new):
    def rename(tensors):
        for key in list(tensors):
            tensors[key.replace(old, new)] = tensors.pop(key)
    return lambda directory: rewrite(directory, rename)


def truncate(directory: Path) -> None:
    path = directory / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def config_of(other: Path):
    """The adapter_config.json of another saved adapter put beside these weights."""
    name = "adapter_config.json"
    return lambda directory: (directory / name).write_bytes((other / name).read_bytes())


def edit_config(**changes):
    return lambda directory: set_config(directory, **changes)


def remove(name):
    return lambda directory: (directory / name).unlink()


def bigger_gpt2():
    torch.manual_seed(0)
    return GPT2Model(GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=100, n_positions=32, bos_token_id=0,
                                eos_token_id=0)).eval()


def lora_args(**override):
    args = dict(x=torch.randn(3, 8), weight=torch.randn(5, 8), bias=None, lora_a=torch.randn(2, 8),
                lora_b=torch.randn(5, 2), scaling=1.0)
    return {**args, **override}


def adapter_args(**override):
    args = dict(h=torch.randn(3, 8), w_down=torch.randn(2, 8), b_down=None, w_up=torch.randn(8, 2), b_up=None)
    return {**args, **override}


def sparse_args(**override):
    args = dict(x=torch.randn(3, 4), weight=torch.randn(5, 4), bias=None, values=torch.randn(2),
                indices=torch.tensor([1, 7]))
    return {**args, **override}


def cli_train(w: World, *flags):
    return partial(main, ["train", "--model", str(packaged_model_dir()), "--data", str(w.tmp / "data.csv"),
                          "--output-dir", str(w.tmp / "out"), *flags])


def nan_lora(w: World):
    """A LoRA GPT-2 that diverged: a NaN in h.0's A."""
    model = w.lora()
    with torch.no_grad():
        next(iter(lora_layers(model)))[1].lora_A["default"][0, 0] = float("nan")
    return model


def minilm_adapter(w: World, config) -> Path:
    """An adapter of `config` on MiniLM, saved beside the case's own."""
    return w.saved(model=inject(minilm(), config), name="minilm")


def merged_of_two(w: World):
    """LoRA adapters 'default' (active, merged) and 'b' on one GPT-2."""
    model = inject(inject(tiny_gpt2(), LORA, adapter_name="b"), LORA)
    randomize_adapter(model, seed=1)
    return w.keep(merge(model))


@dataclass
class Bad:
    """`arrange(world)` builds the call (a partial); it must raise `error` with every regex of `says` (argument name,
    expectation, given value) in its message."""

    arrange: Callable[[World], Callable]
    error: type
    says: tuple[str, ...]


CASES = {
    # --- ops --------------------------------------------------------------------------------------------------
    "lora_linear x of the wrong width": Bad(lambda w: partial(lora_linear, **lora_args(x=torch.randn(3, 7))),
                                            ValueError, (r"x's last dimension", r"in_features 8", r"\(3, 7\)")),
    "lora_linear lora_b in another dtype": Bad(
        lambda w: partial(lora_linear, **lora_args(lora_b=torch.randn(5, 2).bfloat16())),
        TypeError, (r"lora_b has dtype", r"torch.bfloat16", r"x has torch.float32")),
    "lora_linear lora_a on another device": Bad(
        lambda w: partial(lora_linear, **lora_args(lora_a=torch.randn(2, 8, device="meta"))),
        ValueError, (r"lora_a is on meta", r"x is on cpu")),
    "lora_linear rank 0": Bad(lambda w: partial(lora_linear, **lora_args(lora_a=torch.randn(0, 8),
                                                                         lora_b=torch.randn(5, 0))),
                              ValueError, (r"lora_a", r"rank must be >= 1", r"\(0, 8\)")),
    "lora_linear rank above triton's": Bad(
        lambda w: partial(lora_linear, **lora_args(lora_a=torch.randn(65, 8), lora_b=torch.randn(5, 65)),
                          backend="triton"),
        ValueError, (r"lora_a of shape \(65, 8\)", r"up to 64", r"got 65")),
    "lora_linear dropout 1": Bad(lambda w: partial(lora_linear, **lora_args(), dropout_p=1.0),
                                 ValueError, (r"dropout_p", r"\[0, 1\)", r"1\.0")),
    "bottleneck_adapter w_up of the wrong shape": Bad(
        lambda w: partial(bottleneck_adapter, **adapter_args(w_up=torch.randn(8, 3))),
        ValueError, (r"w_up", r"\(8, 2\)", r"\(8, 3\)")),
    "bottleneck_adapter residual on another device": Bad(
        lambda w: partial(bottleneck_adapter, **adapter_args(), residual=torch.randn(3, 8, device="meta")),
        ValueError, (r"residual is on meta", r"h is on cpu")),
    "bottleneck_adapter infinite scaling": Bad(lambda w: partial(bottleneck_adapter, **adapter_args(),
                                                                 scaling=float("inf")),
                                               ValueError, (r"scaling", r"finite number", r"inf")),
    "sparse_delta_linear float indices": Bad(
        lambda w: partial(sparse_delta_linear, **sparse_args(indices=torch.tensor([1.0, 7.0]))),
        TypeError, (r"indices", r"int32 or int64", r"torch.float32")),
    "sparse_delta_linear values on another device": Bad(
        lambda w: partial(sparse_delta_linear, **sparse_args(values=torch.randn(2, device="meta"))),
        ValueError, (r"values is on meta", r"weight is on cpu")),
    "sddmm operands of different lengths": Bad(lambda w: partial(sddmm, torch.randn(3, 4), torch.randn(2, 5),
                                                                 torch.tensor([0, 3])),
                                               ValueError, (r"a and b", r"same number of rows", r"\(3, 4\).*\(2, 5\)")),
    "scatter_delta_ base_values in another dtype": Bad(
        lambda w: partial(scatter_delta_, torch.randn(4, 5), torch.randn(2).half(), torch.randn(2),
                          torch.tensor([0, 3])),
        TypeError, (r"base_values has dtype", r"torch.float16", r"weight has torch.float32")),
    # --- modules ----------------------------------------------------------------------------------------------
    "LoraLinear input of the wrong width": Bad(lambda w: partial(w.keep(LoraLinear.from_linear(nn.Linear(4, 6))),
                                                                 torch.randn(2, 5)),
                                               ValueError, (r"x's last dimension", r"in_features 4", r"\(2, 5\)")),
    "LoraLinear float64 input on a float32 layer": Bad(
        lambda w: partial(w.keep(LoraLinear.from_linear(nn.Linear(4, 6))), torch.randn(2, 4).double()),
        TypeError, (r"has dtype", r"torch.float32", r"torch.float64")),
    "LoraLinear around a Conv2d": Bad(lambda w: partial(LoraLinear.from_linear, w.keep(nn.Conv2d(3, 3, 1))),
                                      TypeError, (r"base_layer", r"nn.Linear or transformers' Conv1D", r"Conv2d")),
    "LoraLinear rank 0": Bad(lambda w: partial(LoraLinear.from_linear, w.keep(nn.Linear(4, 6)), r=0),
                             ValueError, (r"\br\b", r">= 1", r"got 0")),
    "LoraLinear.add_adapter twice with one name": Bad(
        lambda w: partial(w.keep(LoraLinear.from_linear(nn.Linear(4, 6))).add_adapter, "default"),
        ValueError, (r"adapter_name 'default'", r"already exists", r"\['default'\]")),
    "LoraLinear.add_adapter integer dtype": Bad(
        lambda w: partial(w.keep(LoraLinear.from_linear(nn.Linear(4, 6))).add_adapter, "b", dtype=torch.int32),
        ValueError, (r"dtype", r"floating point", r"torch.int32")),
    "BottleneckAdapter input of the wrong width": Bad(
        lambda w: partial(w.keep(BottleneckAdapter(8, bottleneck=2)), torch.randn(2, 5)),
        ValueError, (r"h's last dimension", r"in_features 8", r"\(2, 5\)")),
    "BottleneckAdapter width 0": Bad(lambda w: partial(BottleneckAdapter, 0, bottleneck=2),
                                     ValueError, (r"\bd\b", r">= 1", r"got 0")),
    "SparseDeltaLinear indices beyond the weight": Bad(
        lambda w: partial(SparseDeltaLinear, w.keep(nn.Linear(4, 5)), torch.tensor([0, 30])),
        ValueError, (r"indices", r"\[0, 20\)", r"\[0, 30\]")),
    "SparseDeltaLinear unsorted indices": Bad(
        lambda w: partial(SparseDeltaLinear, w.keep(nn.Linear(4, 5)), torch.tensor([3, 0])),
        ValueError, (r"indices", r"strictly increasing", r"got 3 then 0")),
    # --- configs ----------------------------------------------------------------------------------------------
    "LoraConfig rank 0": Bad(lambda w: partial(LoraConfig, r=0, target_modules=["q"]),
                             ValueError, (r"\br\b", r">= 1", r"got 0")),
    "LoraConfig alpha 0": Bad(lambda w: partial(LoraConfig, lora_alpha=0, target_modules=["q"]),
                              ValueError, (r"lora_alpha", r"non-zero", r"got 0")),
    "LoraConfig dropout 1": Bad(lambda w: partial(LoraConfig, lora_dropout=1.0, target_modules=["q"]),
                                ValueError, (r"lora_dropout", r"\[0, 1\)", r"got 1\.0")),
    "LoraConfig empty target list": Bad(lambda w: partial(LoraConfig, target_modules=[]),
                                        ValueError, (r"target_modules", r"non-empty list", r"got \[\]")),
    "LoraConfig target regex that does not compile": Bad(lambda w: partial(LoraConfig, target_modules="(q"),
                                                         ValueError, (r"target_modules", r"valid regex", r"'\(q'")),
    "BottleneckConfig width 0": Bad(lambda w: partial(BottleneckConfig, bottleneck=0),
                                    ValueError, (r"bottleneck", r">= 1", r"got 0")),
    "BottleneckConfig dropout 1": Bad(lambda w: partial(BottleneckConfig, bottleneck=4, dropout=1.0),
                                      ValueError, (r"dropout", r"\[0, 1\)", r"got 1\.0")),
    "BottleneckConfig scaling 0": Bad(lambda w: partial(BottleneckConfig, bottleneck=4, scaling=0.0),
                                      ValueError, (r"scaling", r"non-zero", r"got 0\.0")),
    "DiffPruningConfig density 0": Bad(lambda w: partial(DiffPruningConfig, target_modules=["q"], density=0.0),
                                       ValueError, (r"density", r"\(0, 1\]", r"got 0\.0")),
    "PromptTuningConfig no virtual tokens": Bad(lambda w: partial(PromptTuningConfig, num_virtual_tokens=0),
                                                ValueError, (r"num_virtual_tokens", r">= 1", r"got 0")),
    # --- inject -----------------------------------------------------------------------------------------------
    "inject unknown module names": Bad(lambda w: partial(inject, w.gpt2(), LoraConfig(target_modules=["query"])),
                                       ValueError, (r"target_modules=\['query'\]", r"matches no module",
                                                    r"named e\.g\. \['c_attn'")),
    "inject twice with one name": Bad(lambda w: partial(inject, w.lora(), LORA.replace(target_modules=["c_fc"])),
                                      ValueError, (r"adapter_name 'default'", r"is taken", r"pick another name")),
    "inject a dict for a config": Bad(lambda w: partial(inject, w.gpt2(), {"target_modules": ["c_attn"]}),
                                      TypeError, (r"config", r"LoraConfig", r"got dict")),
    "inject a dotted adapter name": Bad(lambda w: partial(inject, w.gpt2(), LORA, adapter_name="a.b"),
                                        ValueError, (r"adapter_name", r"without '\.'", r"'a\.b'")),
    "inject into a merged model": Bad(lambda w: partial(inject, w.lora(merged=True),
                                                        LORA.replace(target_modules=["c_fc"]), adapter_name="b"),
                                      ValueError, (r"merged layers", r"'h\.0\.attn\.c_attn'", r"unmerge\(model\)")),
    "inject bottleneck adapters into GPT-2": Bad(lambda w: partial(inject, w.gpt2(), BOTTLENECK),
                                                 ValueError, (r"bottleneck adapters", r"BERT-style",
                                                              r"GPT2Model has neither")),
    # --- save -------------------------------------------------------------------------------------------------
    "save an unknown adapter": Bad(lambda w: partial(save_adapter, w.lora(), w.tmp / "out", adapter_name="b"),
                                   ValueError, (r"adapter_name 'b'", r"unknown", r"\['default'\]")),
    "save below a file": Bad(lambda w: partial(save_adapter, w.lora(), w.saved() / "adapter_config.json" / "sub"),
                             ValueError, (r"directory", r"folders are directories", r"adapter_config\.json/sub")),
    "save non-finite weights over an adapter": Bad(lambda w: partial(save_adapter, nan_lora(w), w.saved()),
                                                   ValueError, (r"non-finite", r"NaN / inf",
                                                                r"h\.0\.attn\.c_attn\.lora_A\.weight")),
    # --- load -------------------------------------------------------------------------------------------------
    "load NaN weights": Bad(lambda w: partial(load_adapter, w.gpt2(), w.saved(set_weight(A0, float("nan")))),
                            ValueError, (r"adapter_model\.safetensors", r"non-finite", r"lora_A\.weight")),
    "load inf weights into an existing adapter": Bad(
        lambda w: partial(load_adapter, w.lora(), w.saved(set_weight(A0, float("inf")))),
        ValueError, (r"adapter_model\.safetensors", r"non-finite", r"lora_A\.weight")),
    "load a truncated safetensors file": Bad(lambda w: partial(load_adapter, w.gpt2(), w.saved(truncate)),
                                             ValueError, (r"adapter_model\.safetensors", r"promises \d+ bytes",
                                                          r"the file has \d+")),
    "load without the weights file": Bad(lambda w: partial(load_adapter, w.gpt2(),
                                                           w.saved(remove("adapter_model.safetensors"))),
                                         FileNotFoundError, (r"adapter weights", r"adapter_model\.safetensors",
                                                             r"do not exist")),
    "load a directory that is not there": Bad(lambda w: partial(load_adapter, w.gpt2(), w.tmp / "nowhere"),
                                              FileNotFoundError, (r"adapter_config\.json", r"nowhere",
                                                                  r"not a saved adapter directory")),
    "load the config of another method beside LoRA weights": Bad(
        lambda w: partial(load_adapter, w.keep(minilm()), w.saved(config_of(minilm_adapter(w, BOTTLENECK)))),
        ValueError, (r"adapter_model\.safetensors", r"does not fit the houlsby bottleneck adapters",
                     r"missing keys", r"unexpected keys .*lora_A")),
    "load keys of layers the model lacks": Bad(lambda w: partial(load_adapter, w.gpt2(),
                                                                 w.saved(rename_keys("h.0.", "h.9."))),
                                               ValueError, (r"adapter_model\.safetensors", r"missing keys .*h\.0\.",
                                                            r"unexpected keys .*h\.9\.")),
    "load an adapter for another model": Bad(
        lambda w: partial(load_adapter, w.gpt2(), minilm_adapter(w, LORA.replace(target_modules=["query"]))),
        ValueError, (r"adapter_config\.json", r"target_modules=\['query'\]", r"matches no module of GPT2Model")),
    "load an adapter for another model size": Bad(lambda w: partial(load_adapter, w.keep(bigger_gpt2()), w.saved()),
                                                  ValueError, (r"shape mismatches", r"file \(4, 64\)",
                                                               r"model \(4, 128\)")),
    "load into a merged adapter": Bad(lambda w: partial(load_adapter, w.lora(merged=True), w.saved()),
                                      ValueError, (r"adapter 'default'", r"is merged", r"unmerge\(model\)")),
    "load settings that disagree with the existing adapter": Bad(
        lambda w: partial(load_adapter, w.lora(LORA.replace(r=2)), w.saved()),
        ValueError, (r"existing adapter 'default'", r"model r=2", r"file r=4")),
    "load an unknown method": Bad(lambda w: partial(load_adapter, w.gpt2(), w.saved(edit_config(method="ia3"))),
                                  ValueError, (r"adapter_config\.json", r"unknown method 'ia3'", r"fastpeft reads")),
    # --- merge and adapter switching --------------------------------------------------------------------------
    "merge a model without adapters": Bad(lambda w: partial(merge, w.gpt2()),
                                          ValueError, (r"GPT2Model", r"no fastpeft adapters", r"inject")),
    "merge a merged model": Bad(lambda w: partial(merge, w.lora(merged=True)),
                                ValueError, (r"already merged", r"'h\.0\.attn\.c_attn'", r"unmerge")),
    "unmerge an unmerged model": Bad(lambda w: partial(unmerge, w.lora()),
                                     ValueError, (r"unmerge\(model\)", r"no layer", r"is merged")),
    "switch adapters on a merged model": Bad(lambda w: partial(set_adapter, merged_of_two(w), "b"),
                                             ValueError, (r"\['default'\]", r"merged", r"switching to 'b'")),
    "delete an unknown adapter": Bad(lambda w: partial(delete_adapter, w.lora(), "b"),
                                     ValueError, (r"adapter_name 'b'", r"unknown", r"\['default'\]")),
    # --- the command line ---------------------------------------------------------------------------------------
    "fastpeft train --r 0": Bad(lambda w: cli_train(w, "--r", "0"), SystemExit, (r"--r", r">= 1", r"got 0")),
    "fastpeft train --lora-alpha 0": Bad(lambda w: cli_train(w, "--lora-alpha", "0"),
                                         SystemExit, (r"lora_alpha", r"non-zero", r"got 0\.0")),
    "fastpeft train --lora-dropout 1": Bad(lambda w: cli_train(w, "--lora-dropout", "1"),
                                           SystemExit, (r"lora_dropout", r"\[0, 1\)", r"got 1\.0")),
    "fastpeft train --lr nan": Bad(lambda w: cli_train(w, "--lr", "nan"),
                                   SystemExit, (r"--lr", r"finite number > 0", r"got nan")),
    "fastpeft demo --device meta": Bad(lambda w: partial(main, ["demo", "--device", "meta"]),
                                       SystemExit, (r"--device", r"cannot train", r"'meta'")),
    "fastpeft train --model without config.json": Bad(
        lambda w: partial(main, ["train", "--model", str(w.tmp), "--data", "x.csv", "--output-dir", "out"]),
        SystemExit, (r"--model", r"Hugging Face model directory", r"no config\.json")),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_bad_input_is_named_and_changes_nothing(tmp_path, capsys, case):
    world = World(tmp_path)
    call = case.arrange(world)
    models, files = [snapshot(m) for m in world.models], world.files()
    capsys.readouterr()
    with pytest.raises(case.error) as raised:
        call()
    message = capsys.readouterr().err if case.error is SystemExit else str(raised.value)
    if case.error is SystemExit:
        assert raised.value.code == 2, "a usage error"
    for pattern in case.says:
        assert re.search(pattern, message), f"{pattern!r} not in the message: {message}"
    for model, before in zip(world.models, models):
        assert_unchanged(model, before)
    assert world.files() == files, "the files on disk changed"
