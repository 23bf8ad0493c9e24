"""One task's labelled data for a multi-task run (`fastpeft train --method multitask --task NAME[:KIND]=PATH`), read
from a .csv or .jsonl file, split, and tokenised once:

  classification        a text and a label name per row (as `fastpeft train`'s --data)
  regression            a text and a number per row
  token_classification  .jsonl only: a list of words and a list of as many tag names per row; a word's first
                        sub-token carries its tag, the others none (-100), as transformers' token-classification
                        examples do
"""
import math
import random
from dataclasses import dataclass
from pathlib import Path

from transformers import DataCollatorForTokenClassification, DataCollatorWithPadding

from fastpeft.datasets import DatasetError, jsonl_rows, load_labelled, read_rows, split
from fastpeft.methods.multitask.loss import IGNORE_INDEX
from fastpeft.methods.multitask.task_option import TaskSpec
from fastpeft.training import EncodedText


@dataclass
class TaskSplit:
    """Inputs (texts, or word lists for token_classification) and labels (class ids, numbers, or tag id lists)."""

    inputs: list
    labels: list
    label_names: list[str] | None  # class or tag names; None for regression

    def __len__(self) -> int:
        return len(self.inputs)

    def subset(self, indices) -> "TaskSplit":
        return TaskSplit([self.inputs[i] for i in indices], [self.labels[i] for i in indices], self.label_names)


def load_task(spec: TaskSpec, text_column: str, label_column: str, test_fraction: float,
              seed: int) -> tuple[TaskSplit, TaskSplit]:
    """The task's train and test splits (a `test_fraction` held out: stratified by label for classification)."""
    if spec.kind == "classification":
        train, test = split(load_labelled(spec.path, text_column, label_column), test_fraction, seed)
        return TaskSplit(train.texts, train.labels, train.label_names), TaskSplit(test.texts, test.labels,
                                                                                  test.label_names)
    data = _regression(spec.path, text_column, label_column) if spec.kind == "regression" else \
        _tagged_words(spec.path, text_column, label_column)
    order = list(range(len(data.inputs)))
    random.Random(seed).shuffle(order)
    held_out = int(test_fraction * len(order) + 0.5)
    if not 0 < held_out < len(order):
        raise DatasetError(f"{spec.path}: too few rows ({len(order)}) to hold out a test fraction of {test_fraction}")
    return data.subset(sorted(order[held_out:])), data.subset(sorted(order[:held_out]))


def _regression(path: Path, text_column: str, label_column: str) -> TaskSplit:
    texts, values = read_rows(path, text_column, label_column)
    numbers = []
    for row, value in enumerate(values, 1):
        try:
            numbers.append(float(value))
        except ValueError:
            numbers.append(math.nan)
        if not math.isfinite(numbers[-1]):
            raise DatasetError(f"{path}: data row {row}: a regression label must be a finite number, got {value!r}")
    return TaskSplit(texts, numbers, None)


def _tagged_words(path: Path, text_column: str, label_column: str) -> TaskSplit:
    if path.suffix != ".jsonl":
        raise DatasetError(f"{path}: token_classification data must be .jsonl (lists of words and tags per row)")
    if not path.is_file():
        raise DatasetError(f"data file not found: {path}")
    words, tags = [], []
    for line_num, row in jsonl_rows(path)[0]:
        text, labels = row.get(text_column), row.get(label_column)
        if not (isinstance(text, list) and isinstance(labels, list) and text and len(text) == len(labels)
                and all(isinstance(w, str) for w in text) and all(isinstance(t, str) for t in labels)):
            raise DatasetError(f"{path}: line {line_num}: {text_column!r} and {label_column!r} must be non-empty "
                               f"lists of as many strings (words and their tags), got {text!r} and {labels!r}")
        words.append(text)
        tags.append(labels)
    if not words:
        raise DatasetError(f"{path}: the file has no data rows")
    names = sorted({t for row in tags for t in row})
    ids = {name: i for i, name in enumerate(names)}
    return TaskSplit(words, [[ids[t] for t in row] for row in tags], names)


class EncodedTask(EncodedText):
    """A task's split tokenised once; `batches` pads each batch to its own longest sequence."""

    def __init__(self, tokenizer, kind: str, data: TaskSplit, max_length: int):
        self.kind = kind
        words = kind == "token_classification"
        encoded = tokenizer(data.inputs, truncation=True, max_length=max_length, is_split_into_words=words)
        self.features = [{key: value[i] for key, value in encoded.items()} for i in range(len(data.inputs))]
        for i, (feature, label) in enumerate(zip(self.features, data.labels)):
            feature["labels"] = _first_piece_tags(encoded.word_ids(i), label) if words else label
        self.collate = (DataCollatorForTokenClassification if words else DataCollatorWithPadding)(
            tokenizer, return_tensors="pt")


def _first_piece_tags(word_ids: list, tags: list[int]) -> list[int]:
    """Each word's tag on its first sub-token; IGNORE_INDEX on special tokens and later sub-tokens."""
    labels, previous = [], None
    for word in word_ids:
        labels.append(IGNORE_INDEX if word is None or word == previous else tags[word])
        previous = word
    return labels
