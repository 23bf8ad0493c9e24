"""Diff pruning at model level on MiniLM (BERT, nn.Linear) and a tiny GPT-2 (Conv1D): injection, the L0 penalty,
projection (exactly k entries, the largest, per weight and global), trainable parameters per stage, save / load
round trips, merge / unmerge / merge_and_unload, methods that do not mix, config errors, and bad files and inputs
that give clear errors and leave the model unchanged."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from fastpeft import (DiffPruningConfig, LoraConfig, adapter_config, adapter_names, inject, l0_penalty,
                      load_adapter, merge, merge_and_unload, project_to_density, save_adapter, trainable_parameters,
                      unmerge)
from fastpeft.methods.diff_pruning.layers import search_layers, sparse_layers
from fastpeft.methods.diff_pruning.search import kept_count
from fastpeft.modules.diff_search import DiffSearchLinear
from fastpeft.modules.sparse_delta import SparseDeltaLinear
from tests.model_cases import assert_unchanged, gpt2_batch, hidden, minilm, minilm_batch, snapshot, tiny_gpt2
from tests.model_cases import one_thread  # noqa: F401  (autouse fixture)

ATTN = ["h.0.attn.c_attn", "h.1.attn.c_attn"]  # the tiny GPT-2's Conv1D [64, 192]


def outputs(model, batch=None) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return hidden(model, batch or gpt2_batch())


@torch.no_grad()
def fill_diffs(model, seed: int = 0, scale: float = 0.05) -> None:
    """Distinct random diffs, as after a search."""
    g = torch.Generator().manual_seed(seed)
    for _, layer in search_layers(model):
        layer.diff.copy_(scale * torch.randn(layer.diff.shape, generator=g))


def searched(config: DiffPruningConfig, seed: int = 0):
    model = inject(tiny_gpt2(), config)
    fill_diffs(model, seed)
    return model


def projected(config: DiffPruningConfig, seed: int = 0):
    model = searched(config, seed)
    project_to_density(model)
    return model


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


# --- config -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    ({"target_modules": None}, "target_modules is required"), ({"density": 0}, r"density .*\(0, 1\], got 0"),
    ({"density": 1.5}, "density"), ({"density": True}, "density"), ({"scope": "layer"}, "scope must be one of"),
    ({"temperature": 0}, "temperature must be a finite number > 0"), ({"stretch": (0.1, 1.5)}, "stretch"),
    ({"stretch": (-1.5, 0.9)}, "stretch"), ({"stretch": -1.5}, "stretch"), ({"log_alpha_init": float("nan")},
                                                                           "log_alpha_init"),
    ({"structured": 1}, "structured must be a bool"), ({"l0_weight": -1}, "l0_weight must be a finite number >= 0"),
    ({"l0_weight": float("inf")}, "l0_weight"), ({"modules_to_save": "ln_f"}, "modules_to_save"),
    ({"base_model_name_or_path": 3}, "base_model_name_or_path"),
])
def test_bad_config_values_are_named(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        DiffPruningConfig(**{"target_modules": ["c_attn"], **kwargs})


def test_config_round_trips_through_its_dict():
    config = DiffPruningConfig(target_modules=["value", "query"], density=0.02, scope="global", temperature=0.5,
                               stretch=[-0.1, 1.1], structured=True, l0_weight=3, modules_to_save=["classifier"])
    assert config.target_modules == ("query", "value") and config.stretch == (-0.1, 1.1)
    written = json.loads(json.dumps(config.to_dict()))
    assert written["method"] == "diff_pruning" and written["stretch"] == [-0.1, 1.1]
    assert DiffPruningConfig.from_dict(written) == config
    with pytest.raises(ValueError, match=r"src: unknown diff pruning settings \['r'\]"):
        DiffPruningConfig.from_dict({**written, "r": 8}, source="src")
    with pytest.raises(ValueError, match="method is 'bottleneck_adapter', expected 'diff_pruning'"):
        DiffPruningConfig.from_dict({**written, "method": "bottleneck_adapter"})


# --- stage 1: injection and the L0 penalty ------------------------------------------------------------------------
def test_inject_on_minilm_wraps_the_targets_and_starts_as_the_base_model():
    reference = outputs(minilm(), minilm_batch())
    model = inject(minilm(), DiffPruningConfig(target_modules=["query", "value"]))
    paths = [path for path, _ in search_layers(model)]
    assert paths == [f"encoder.layer.{i}.attention.self.{n}" for i in range(6) for n in ("query", "value")]
    assert torch.equal(outputs(model, minilm_batch()), reference)  # zero diffs
    assert all(n.endswith((".diff", ".gate.log_alpha")) for n in trainable(model))
    assert trainable_parameters(model)[0] == 12 * 2 * 384 * 384


def test_inject_on_gpt2_structured_with_modules_to_save():
    reference = outputs(tiny_gpt2())
    model = inject(tiny_gpt2(), DiffPruningConfig(target_modules=["c_attn"], structured=True,
                                                  modules_to_save=["ln_f"]))
    assert [path for path, _ in search_layers(model)] == ATTN
    assert all(layer.fan_in_fan_out and layer.diff.shape == (64, 192) for _, layer in search_layers(model))
    assert torch.equal(outputs(model), reference)
    assert trainable(model) == {f"{p}.{n}" for p in ATTN for n in ("diff", "gate.log_alpha", "group_gate.log_alpha")} \
        | {"ln_f.modules_to_save.default.weight", "ln_f.modules_to_save.default.bias"}
    assert adapter_names(model) == ["default"]


@pytest.mark.parametrize("structured", [False, True])
def test_l0_penalty_is_l0_weight_times_the_expected_fraction_of_nonzero_entries(structured):
    model = inject(tiny_gpt2(), DiffPruningConfig(target_modules=["c_attn", "c_fc"], l0_weight=2.0,
                                                  log_alpha_init=1.0, temperature=0.5, structured=structured))
    layers = [layer for _, layer in search_layers(model)]
    with torch.no_grad():
        layers[0].gate.log_alpha[:10].fill_(-3.0)
    shift = 0.5 * torch.log(torch.tensor(1.5 / 1.5))  # temperature * log(-l / r)
    expected = 0
    for layer in layers:
        p = torch.sigmoid(layer.gate.log_alpha - shift).sum()
        expected = expected + (p * torch.sigmoid(layer.group_gate.log_alpha - shift) if structured else p)
    numel = sum(layer.diff.numel() for layer in layers)
    penalty = l0_penalty(model)
    torch.testing.assert_close(penalty, 2.0 * expected / numel)
    assert 0 < penalty < 2.0
    penalty.backward()
    assert all(layer.gate.log_alpha.grad.gt(0).all() and layer.diff.grad is None for layer in layers)


def test_search_steps_train_diffs_and_gates_and_nothing_else():
    model = inject(tiny_gpt2(), DiffPruningConfig(target_modules=["c_attn"], l0_weight=10.0))
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        (hidden(model, gpt2_batch()).square().mean() + l0_penalty(model)).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    for _, layer in search_layers(model):
        assert layer.diff.abs().max() > 0 and layer.gate.log_alpha.max() < 5.0


# --- projection ---------------------------------------------------------------------------------------------------
def kept_and_dropped(model, gated: dict[str, torch.Tensor]):
    kept, dropped = [], []
    for path, layer in sparse_layers(model):
        flat = gated[path].flatten()
        mask = torch.zeros(flat.numel(), dtype=torch.bool)
        mask[layer.indices.long()] = True
        kept.append(flat[mask].abs())
        dropped.append(flat[~mask].abs())
        assert torch.equal(layer.values, flat[layer.indices.long()])  # the gated diff there
        assert layer.indices.dtype == torch.int32 and bool((layer.indices[1:] > layer.indices[:-1]).all())
    return kept, dropped


def test_per_weight_projection_keeps_exactly_k_largest_gated_entries():
    model = searched(DiffPruningConfig(target_modules=["c_attn", "c_fc"], density=0.03, modules_to_save=["ln_f"]))
    first = model.h[0].attn.c_attn
    with torch.no_grad():  # large diffs behind closed gates: their gated diff is 0, so they must not be kept
        first.diff[0].fill_(10.0)
        first.gate.log_alpha[0].fill_(-10.0)
    gated = {path: layer.gated_diff() for path, layer in search_layers(model)}
    assert not gated["h.0.attn.c_attn"][0].any()
    project_to_density(model)
    assert [p for p, _ in sparse_layers(model)] == ["h.0.attn.c_attn", "h.0.mlp.c_fc", "h.1.attn.c_attn",
                                                    "h.1.mlp.c_fc"]
    kept, dropped = kept_and_dropped(model, gated)
    for (_, layer), k, d in zip(sparse_layers(model), kept, dropped):
        numel = layer.base_layer.weight.numel()
        assert layer.nnz == kept_count(0.03, numel) == round(0.03 * numel)
        assert k.min() >= d.max()
    assert trainable(model) == {f"{p}.values" for p, _ in sparse_layers(model)} | \
        {"ln_f.modules_to_save.default.weight", "ln_f.modules_to_save.default.bias"}
    assert adapter_config(model, "default").density == 0.03


def test_global_projection_ranks_all_targets_together():
    model = searched(DiffPruningConfig(target_modules=["c_attn", "c_fc"], density=0.02, scope="global"))
    with torch.no_grad():
        model.h[1].mlp.c_fc.diff.mul_(10)  # this weight's entries dominate the global ranking
    gated = {path: layer.gated_diff() for path, layer in search_layers(model)}
    project_to_density(model)
    total = sum(g.numel() for g in gated.values())
    nnz = {path: layer.nnz for path, layer in sparse_layers(model)}
    assert sum(nnz.values()) == kept_count(0.02, total) == round(0.02 * total)
    assert nnz["h.1.mlp.c_fc"] == max(nnz.values()) > 0.9 * sum(nnz.values())
    kept, dropped = kept_and_dropped(model, gated)
    assert min(k.min() for k in kept if k.numel()) >= max(d.max() for d in dropped)


def test_projection_arguments_override_the_config_and_are_recorded():
    model = searched(DiffPruningConfig(target_modules=["c_attn"], density=0.5))
    project_to_density(model, density=0.01, scope="global")
    config = adapter_config(model, "default")
    assert (config.density, config.scope) == (0.01, "global")
    assert sum(layer.nnz for _, layer in sparse_layers(model)) == round(0.01 * 2 * 64 * 192)


def test_tiny_density_keeps_one_entry_per_weight_and_ties_keep_the_first_positions():
    model = inject(tiny_gpt2(), DiffPruningConfig(target_modules=["c_attn"], density=1e-9))
    project_to_density(model)  # zero diffs: every score ties
    assert all(layer.indices.tolist() == [0] for _, layer in sparse_layers(model))
    model = inject(tiny_gpt2(), DiffPruningConfig(target_modules=["c_attn"], density=0.001))
    project_to_density(model)
    assert all(layer.indices.tolist() == list(range(12)) for _, layer in sparse_layers(model))  # round(12.288)


def test_full_density_keeps_the_search_model():
    model = searched(DiffPruningConfig(target_modules=["c_attn", "c_proj"], density=1.0))
    before = outputs(model)
    project_to_density(model)
    assert all(layer.nnz == layer.base_layer.weight.numel() for _, layer in sparse_layers(model))
    torch.testing.assert_close(outputs(model), before)


def test_fixed_mask_training_changes_weights_only_at_the_mask():
    model = projected(DiffPruningConfig(target_modules=["c_attn"], density=0.05, modules_to_save=["ln_f"]))
    weights = {path: layer.base_layer.weight.clone() for path, layer in sparse_layers(model)}
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        hidden(model, gpt2_batch()).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    outputs(model)  # scatters the last step
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen and
               not n.endswith("base_layer.weight"))
    for path, layer in sparse_layers(model):
        changed = (layer.base_layer.weight != weights[path]).flatten().nonzero().flatten()
        assert changed.numel() > 0 and set(changed.tolist()) <= set(layer.indices.tolist())
    assert not torch.equal(model.ln_f.modules_to_save["default"].weight, model.ln_f.original_module.weight)


# --- merge --------------------------------------------------------------------------------------------------------
def test_merge_unmerge_and_merge_and_unload():
    base = tiny_gpt2()
    w0 = {path: base.get_submodule(path).weight.clone() for path in ATTN}
    model = projected(DiffPruningConfig(target_modules=["c_attn"], density=0.05, modules_to_save=["ln_f"]))
    trained = outputs(model)
    with pytest.raises(ValueError, match="already merged .*built merged"):
        merge(model)
    unmerge(model)
    assert all(torch.equal(model.get_submodule(p).base_layer.weight, w0[p]) for p in ATTN)  # bit-exact
    torch.testing.assert_close(outputs(model), trained)
    with pytest.raises(ValueError, match="no layer of the model is merged"):
        unmerge(model)
    merge(model)
    torch.testing.assert_close(outputs(model), trained)
    unmerge(model)  # merge_and_unload merges what is not merged
    deltas = {path: layer.delta_weight() for path, layer in sparse_layers(model)}
    merge_and_unload(model)
    assert all(type(model.get_submodule(p)) is Conv1D for p in ATTN) and type(model.ln_f) is nn.LayerNorm
    for path in ATTN:
        torch.testing.assert_close(model.get_submodule(path).weight, w0[path] + deltas[path], rtol=0, atol=0)
    assert not adapter_names(model)
    torch.testing.assert_close(outputs(model), trained)


@pytest.mark.parametrize("merged", [True, False])
def test_load_state_dict_into_a_merged_or_unmerged_model(merged):
    """A state_dict holds the merged weight: loaded into an unmerged layer it must not get the delta twice."""
    model = projected(DiffPruningConfig(target_modules=["c_attn"], density=0.05))
    with torch.no_grad():
        for _, layer in sparse_layers(model):
            layer.values.add_(0.02)
    trained, state = outputs(model), model.state_dict()
    target = projected(DiffPruningConfig(target_modules=["c_attn"], density=0.05), seed=1)  # another mask
    if not merged:
        unmerge(target)
    target.load_state_dict(state)
    assert torch.equal(outputs(target), trained)
    if not merged:
        merge(target)
        assert torch.equal(outputs(target), trained)


def test_tied_weights_are_refused():
    model = GPT2LMHeadModel(tiny_gpt2().config)  # lm_head.weight is transformer.wte.weight
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"lm_head.weight is shared with transformer.wte.weight \(tied weights\)"):
        inject(model, DiffPruningConfig(target_modules=["lm_head", "c_attn"]))
    assert_unchanged(model, before)


@pytest.mark.parametrize("backend", ["torch", "ext"])
def test_another_optimizers_step_between_two_forwards_leaves_their_graphs_valid(backend, monkeypatch):
    """A scatter (bumping the weight's version) only when the values change, not on any optimizer's step."""
    monkeypatch.setenv("FASTPEFT_BACKEND", backend)
    model = projected(DiffPruningConfig(target_modules=["c_attn"], density=0.05))
    other = nn.Linear(3, 3)
    optimizer = torch.optim.AdamW(other.parameters(), lr=1e-2, fused=True)
    batch = gpt2_batch()
    first = hidden(model, batch).sum()
    other(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    second = hidden(model, batch).sum()
    (first + second).backward()  # raised "modified by an inplace operation" when any step forced a scatter
    assert all(layer.values.grad is not None for _, layer in sparse_layers(model))


@pytest.mark.parametrize("fused", [False, True])
def test_steps_after_the_last_forward_reach_state_dict_and_merge_and_unload(fused):
    """The merged weight is scattered lazily (on the next forward): reading it any other way must not see a stale
    weight after optimizer steps (a fused AdamW bumps no version counter)."""
    model = projected(DiffPruningConfig(target_modules=["c_attn"], density=0.05))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=fused)
    for _ in range(2):
        hidden(model, gpt2_batch()).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    expected = {path: layer.base_layer.weight.detach().clone().view(-1).index_copy_(
        0, layer.indices.long(), (layer.base_values + layer.values.detach()).to(layer.base_layer.weight.dtype))
        for path, layer in sparse_layers(model)}
    state = model.state_dict()
    for path in ATTN:
        assert torch.equal(state[f"{path}.base_layer.weight"].view(-1), expected[path])
    trained = outputs(model)
    merge_and_unload(model)
    for path in ATTN:
        assert torch.equal(model.get_submodule(path).weight.view(-1), expected[path])
    torch.testing.assert_close(outputs(model), trained, rtol=0, atol=0)


def test_search_stage_cannot_merge_or_save_and_save_needs_the_adapter_name(tmp_path):
    model = searched(DiffPruningConfig(target_modules=["c_attn"]))
    before = snapshot(model)
    for fn in (merge, merge_and_unload):
        with pytest.raises(ValueError, match=r"still searching .*project_to_density\(model\) first"):
            fn(model)
    with pytest.raises(ValueError, match=r"no layer of the model is merged"):
        unmerge(model)
    with pytest.raises(ValueError, match=r"still searching .*call project_to_density\(model\) first"):
        save_adapter(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
    assert_unchanged(model, before)
    project_to_density(model)
    with pytest.raises(ValueError, match=r"unknown adapter_name 'other': it has \['default'\]"):
        save_adapter(model, tmp_path / "adapter", adapter_name="other")


# --- methods do not mix, bad input --------------------------------------------------------------------------------
def test_other_methods_share_the_model_only_on_other_modules(tmp_path):
    model = projected(DiffPruningConfig(target_modules=["c_attn"]))
    before = snapshot(model)
    with pytest.raises(ValueError, match="LoRA adapter 'lora' would adapt 'h.0.attn.c_attn', where diff pruning "
                                         "adapter 'default' sits"):
        inject(model, LoraConfig(target_modules=["c_attn"]), adapter_name="lora")
    with pytest.raises(ValueError, match="already has diff pruning adapter 'default'; a model holds one"):
        inject(model, DiffPruningConfig(target_modules=["c_proj"]), adapter_name="other")
    lora = inject(tiny_gpt2(), LoraConfig(target_modules=["c_attn"]))
    save_adapter(lora, tmp_path / "lora")
    with pytest.raises(ValueError, match="LoRA adapter 'lora' would adapt 'h.0.attn.c_attn'"):
        load_adapter(model, tmp_path / "lora", adapter_name="lora")
    with pytest.raises(ValueError, match="project_to_density: the model's mask is already fixed"):
        project_to_density(model)
    with pytest.raises(ValueError, match="no search layers left"):
        l0_penalty(model)
    assert_unchanged(model, before)
    save_adapter(model, tmp_path / "diff")
    with pytest.raises(ValueError, match="diff pruning adapter 'diff' would adapt 'h.0.attn.c_attn', where LoRA"):
        load_adapter(lora, tmp_path / "diff", adapter_name="diff")
    inject(model, LoraConfig(target_modules=["c_fc"]), adapter_name="lora")  # other modules: both run
    assert adapter_names(model) == ["default", "lora"]


def test_bad_inputs_are_named_and_leave_the_model_unchanged():
    model = searched(DiffPruningConfig(target_modules=["c_attn"]))
    before = snapshot(model)
    for kwargs, message in (({"density": 0}, "density"), ({"density": 2.0}, "density"),
                            ({"scope": "layer"}, "scope must be one of")):
        with pytest.raises(ValueError, match=message):
            project_to_density(model, **kwargs)
    with torch.no_grad():
        model.h[1].attn.c_attn.diff[0, 0] = float("nan")
    with pytest.raises(ValueError, match="gated diff of h.1.attn.c_attn has non-finite entries"):
        project_to_density(model)
    with torch.no_grad():
        model.h[1].attn.c_attn.diff[0, 0] = before["state"]["h.1.attn.c_attn.diff"][0, 0]
    assert_unchanged(model, before)
    plain = tiny_gpt2()
    before = snapshot(plain)
    with pytest.raises(ValueError, match="GPT2Model has no diff pruning adapter"):
        l0_penalty(plain)
    with pytest.raises(ValueError, match="no diff pruning adapter"):
        project_to_density(plain)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        l0_penalty("model")
    with pytest.raises(ValueError, match=r"selects modules diff pruning cannot wrap .*h\.0\.attn \(GPT2Attention\)"):
        inject(plain, DiffPruningConfig(target_modules=r"h\.0\.attn"))
    with pytest.raises(ValueError, match="matches no module"):
        inject(plain, DiffPruningConfig(target_modules=["query"]))
    with pytest.raises(ValueError, match="adapter_name must be a non-empty string"):
        inject(plain, DiffPruningConfig(target_modules=["c_attn"]), adapter_name="a.b")
    assert_unchanged(plain, before)


# --- save / load --------------------------------------------------------------------------------------------------
def saved(tmp_path, config: DiffPruningConfig):
    model = projected(config)
    with torch.no_grad():  # trained-looking values and head
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    save_adapter(model, tmp_path / "adapter")
    return model, tmp_path / "adapter"


@pytest.mark.parametrize("config", [
    DiffPruningConfig(target_modules=["c_attn"], density=0.02, modules_to_save=["ln_f"]),
    DiffPruningConfig(target_modules="all-linear", density=0.01, scope="global", structured=True),
], ids=["per-weight", "all-linear-global"])
def test_save_load_round_trip_is_exact(tmp_path, config):
    model, directory = saved(tmp_path, config)
    written = json.loads((directory / "adapter_config.json").read_text())
    assert written["method"] == "diff_pruning" and written["density"] == config.density
    if config.target_modules == "all-linear":  # saved as the layers it resolved to
        assert written["target_modules"] == sorted(path for path, _ in sparse_layers(model))
    tensors = load_file(directory / "adapter_model.safetensors")
    for path, layer in sparse_layers(model):
        indices, values = tensors[f"base_model.model.{path}.indices"], tensors[f"base_model.model.{path}.values"]
        assert indices.dtype == torch.int32 and values.dtype == torch.float32
        assert torch.equal(indices, layer.indices) and torch.equal(values, layer.values)
    loaded = load_adapter(tiny_gpt2(), directory)
    assert torch.equal(outputs(loaded), outputs(model))
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert {n: p.requires_grad for n, p in loaded.named_parameters()} == \
        {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(layer.merged for _, layer in sparse_layers(loaded))


def test_minilm_round_trip_and_int64_indices(tmp_path):
    model = inject(minilm(), DiffPruningConfig(target_modules=["query", "value"], density=0.01,
                                               modules_to_save=["pooler"]))
    fill_diffs(model)
    project_to_density(model)
    save_adapter(model, tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    save_file({k: v.long() if k.endswith(".indices") else v for k, v in load_file(path).items()}, path)
    loaded = load_adapter(minilm(), tmp_path / "adapter")
    assert all(layer.indices.dtype == torch.int32 for _, layer in sparse_layers(loaded))
    assert torch.equal(outputs(loaded, minilm_batch()), outputs(model, minilm_batch()))


def rewrite_weights(directory, change) -> None:
    path = directory / "adapter_model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def layer_key(name: str, path: str = "h.0.attn.c_attn") -> str:
    return f"base_model.model.{path}.{name}"


def set_key(key: str, value) -> callable:
    return lambda d: rewrite_weights(d, lambda t: t.update({key: value(t[key]) if callable(value) else value}))


def write_config(**changes) -> callable:
    def damage(directory):
        path = directory / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return damage


def move_layer(to: str) -> callable:
    def change(tensors):
        for name in ("indices", "values"):
            tensors[layer_key(name, to)] = tensors.pop(layer_key(name, "h.1.attn.c_attn"))
    return lambda d: rewrite_weights(d, change)


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x00" * 10), "not a readable safetensors file"),
    (lambda d: rewrite_weights(d, lambda t: t.pop(layer_key("values"))), r"missing keys \(1\): .*c_attn.values"),
    (lambda d: rewrite_weights(d, lambda t: t.update(extra=torch.zeros(1))), r"unexpected keys \(1\): extra"),
    (set_key(layer_key("indices"), lambda i: i.float()), "c_attn.indices: expected a 1-D int32 or int64 tensor, "
                                                         "got torch.float32"),
    (set_key(layer_key("indices"), lambda i: torch.cat([i[:-1], i.new_tensor([64 * 192])])),
     r"c_attn.indices: indices must lie in \[0, 12288\)"),
    (set_key(layer_key("indices"), lambda i: i.flip(0)), "strictly increasing"),
    (set_key(layer_key("indices"), lambda i: torch.cat([i[:1], i[:-1]])), "strictly increasing"),
    (set_key(layer_key("values"), lambda v: v[:-1]), r"c_attn.values: 245 of them for 246 indices"),
    (set_key(layer_key("values"), lambda v: v.half()), "values: expected a 1-D float32 tensor, got torch.float16"),
    (set_key(layer_key("values"), lambda v: v.clone().fill_(float("inf"))),
     r"holds non-finite values \(NaN / inf\): base_model.model.h.0.attn.c_attn.values"),
    (set_key("base_model.model.ln_f.weight", torch.zeros(3)), r"ln_f.weight: file shape \(3,\), model \(64,\)"),
    (move_layer("h.7.attn.c_attn"), "h.7.attn.c_attn.indices \\(the model has no layer 'h.7.attn.c_attn'\\)"),
    (move_layer("h.1.ln_1"), "h.1.ln_1 is a LayerNorm, not a linear layer"),
    (move_layer("h.1.mlp.c_fc"), "h.1.mlp.c_fc is not one of the config's target_modules"),
    (write_config(density=2), "adapter_config.json: density"),
    (write_config(density=0.5), r"indices that do not match density=0.5, scope='per_weight' \(2\): "
                                r"h.0.attn.c_attn: 246 kept, not 6144"),
    (write_config(rank=2), r"unknown diff pruning settings \['rank'\]"),
    (write_config(target_modules=["query"]), "matches no module of GPT2Model"),
])
def test_bad_files_are_named_and_leave_the_model_unchanged(tmp_path, damage, message):
    _, directory = saved(tmp_path, DiffPruningConfig(target_modules=["c_attn"], density=0.02,
                                                     modules_to_save=["ln_f"]))
    damage(directory)
    model = tiny_gpt2()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message) as error:
        load_adapter(model, directory)
    assert str(directory / "adapter_config.json") in str(error.value) or \
        f"{directory / 'adapter_model.safetensors'} does not fit a diff pruning adapter of GPT2Model" in \
        str(error.value) or "not a readable safetensors file" in message or "holds non-finite values" in message
    assert_unchanged(model, before)
    assert not adapter_names(model)


def test_a_layer_of_the_same_size_but_another_shape_is_refused(tmp_path):
    """Flat positions in a [4, 8] weight are other entries of an [8, 4] one."""
    wide, tall = nn.Sequential(nn.Linear(8, 4)), nn.Sequential(nn.Linear(4, 8))
    config = DiffPruningConfig(target_modules=["0"], density=0.25)
    inject(wide, config)
    project_to_density(wide)
    save_adapter(wide, tmp_path / "adapter")
    before = snapshot(tall)
    with pytest.raises(ValueError, match=r"weight shape mismatches \(1\): 0: file \(4, 8\), model \(8, 4\)"):
        load_adapter(tall, tmp_path / "adapter")
    assert_unchanged(tall, before)
    assert load_adapter(nn.Sequential(nn.Linear(8, 4)), tmp_path / "adapter")  # the same shape loads


def test_a_failure_while_building_undoes_what_was_built(tmp_path, monkeypatch):
    _, directory = saved(tmp_path, DiffPruningConfig(target_modules=["c_attn"], density=0.02))
    model = tiny_gpt2()
    before = snapshot(model)
    built = []

    def fail_on_second(self, *args, **kwargs):
        if built:
            raise RuntimeError("out of memory")
        built.append(self)
        original(self, *args, **kwargs)

    original = SparseDeltaLinear.__init__
    monkeypatch.setattr(SparseDeltaLinear, "__init__", fail_on_second)
    with pytest.raises(RuntimeError, match="out of memory"):
        load_adapter(model, directory)
    assert built and not any(isinstance(m, (SparseDeltaLinear, DiffSearchLinear)) for m in model.modules())
    assert_unchanged(model, before)
