"""Cross-lingual transfer: fine-tune a multilingual encoder from any local model directory (e.g. XLM-RoBERTa) with
LoRA on labelled text of one language, then evaluate on others, whose examples it never saw."""
from dataclasses import dataclass

import transformers

from fastpeft import training
from fastpeft.api import inject, save_adapter
from fastpeft.datasets import LabelledText
from fastpeft.methods.lora import LoraConfig


@dataclass
class TransferResult:
    accuracy: dict[str, float]  # per evaluation language
    losses: list[float]  # of the training steps, on the training language


def cross_lingual_transfer(model_dir, train: LabelledText, evaluations: dict[str, LabelledText], config=None,
                           epochs: int = 3, lr: float = 1e-3, batch_size: int = 16, max_length: int = 128,
                           seed: int = 0, device="cpu", adapter_dir=None) -> TransferResult:
    """Train `config` (default: LoRA r=8 on the attention query / value, the classifier head in full) on `train`,
    evaluate on each of `evaluations` (language -> labelled text, same labels); save the adapter to `adapter_dir`
    if given."""
    if not evaluations:
        raise ValueError("evaluations must name at least one language's labelled text, got none")
    for language, data in evaluations.items():
        if data.label_names != train.label_names:
            raise ValueError(f"evaluations[{language!r}] has labels {data.label_names}, expected the training "
                             f"labels {train.label_names}")
    transformers.set_seed(seed)
    model, tokenizer = training.load_classifier(model_dir, train.label_names, device)
    inject(model, config or LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS"))
    result = training.train(model, training.EncodedText(tokenizer, train, max_length), epochs, lr, batch_size,
                            seed=seed, device=device, progress=False, desc="cross-lingual")
    accuracy = {language: training.evaluate(model, training.EncodedText(tokenizer, data, max_length),
                                            device=device)[0] for language, data in evaluations.items()}
    if adapter_dir is not None:
        save_adapter(model, adapter_dir)
    return TransferResult(accuracy, result.losses)
