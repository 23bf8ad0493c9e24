"""Labelled text for sequence classification, read from .csv or .jsonl files.

Labels are names; ids follow the sorted names of the training split, and every other split must use only those
names. Every problem with a file is a `DatasetError` that names the file (and line, column or label).
"""
import csv
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
FORMATS = (".csv", ".jsonl")


class DatasetError(ValueError):
    """A data file that cannot be used as given."""


@dataclass
class LabelledText:
    texts: list[str]
    labels: list[int]
    label_names: list[str]  # label id -> name

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices) -> "LabelledText":
        return LabelledText([self.texts[i] for i in indices], [self.labels[i] for i in indices], self.label_names)


def csv_rows(path: Path):
    """(line number, row dict) per data row, and the header's column names."""
    with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: a byte order mark is not part of a name
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        return [(reader.line_num, row) for row in reader], columns


def jsonl_rows(path: Path):
    rows = []
    with path.open(encoding="utf-8-sig") as f:
        for line_num, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}: line {line_num} is not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DatasetError(f"{path}: line {line_num} must be a JSON object, got {type(row).__name__}")
            rows.append((line_num, row))
    return rows, list(rows[0][1]) if rows else []


def _label_name(value, path: Path, line_num: int, column: str) -> str:
    """A label cell as a name: strings stripped, integral numbers as integers (1 and 1.0 are one class)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        value = value.strip()
    elif isinstance(value, (bool, int)) or (isinstance(value, float) and math.isfinite(value)):
        value = str(value)
    elif value is not None:
        raise DatasetError(f"{path}: line {line_num}: {column!r} must be a string, number or boolean, got {value!r}")
    if not value:
        raise DatasetError(f"{path}: line {line_num}: empty label in column {column!r}")
    return value


def read_rows(path, text_column: str = "text", label_column: str = "label") -> tuple[list[str], list[str]]:
    """(texts, label names) from a .csv (with a header) or .jsonl (one object a line) file."""
    path = Path(path)
    if path.suffix not in FORMATS:
        raise DatasetError(f"{path}: unsupported file type {path.suffix!r}; expected one of {FORMATS}")
    if not path.is_file():
        raise DatasetError(f"data file not found: {path}")
    rows, columns = (csv_rows if path.suffix == ".csv" else jsonl_rows)(path)
    if not rows:
        raise DatasetError(f"{path}: the file has no data rows")
    texts, labels = [], []
    for line_num, row in rows:
        for column in (text_column, label_column):
            if column not in row or (row[column] is None and path.suffix == ".csv"):  # csv: a short row
                where = f"line {line_num} has no" if column in columns else "no"
                raise DatasetError(f"{path}: {where} column {column!r}; the columns are {columns}")
        text = row[text_column]
        if not isinstance(text, str):
            raise DatasetError(f"{path}: line {line_num}: {text_column!r} must be a string, got {text!r}")
        texts.append(text)
        labels.append(_label_name(row[label_column], path, line_num, label_column))
    return texts, labels


def load_labelled(path, text_column: str = "text", label_column: str = "label",
                  label_names: list[str] | None = None) -> LabelledText:
    """Read a file; label ids come from `label_names` (e.g. the training split's) or from this file's sorted names,
    of which there must be at least two (one label would make transformers train a regression head)."""
    texts, names = read_rows(path, text_column, label_column)
    if label_names is None:
        label_names = sorted(set(names))
        if len(label_names) < 2:
            raise DatasetError(f"{path}: column {label_column!r} holds one label, {label_names[0]!r}; "
                               "classification needs at least two")
    ids = {name: i for i, name in enumerate(label_names)}
    unknown = sorted(set(names) - set(ids))
    if unknown:
        raise DatasetError(f"{path}: unknown label(s) {unknown} in column {label_column!r}; "
                           f"the training labels are {label_names}")
    return LabelledText(texts, [ids[n] for n in names], label_names)


def split(data: LabelledText, test_fraction: float, seed: int = 0) -> tuple[LabelledText, LabelledText]:
    """Stratified train/test split: `test_fraction` of all examples (rounded half up) go to the test set, shared
    out over the labels in proportion by largest remainder; every label keeps at least one training example."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = random.Random(seed)
    groups = [[i for i, y in enumerate(data.labels) if y == label] for label in range(len(data.label_names))]
    for members in groups:
        rng.shuffle(members)
    quotas = [test_fraction * len(members) for members in groups]
    counts = [min(int(q), max(len(members) - 1, 0)) for q, members in zip(quotas, groups)]
    left = int(test_fraction * len(data) + 0.5) - sum(counts)
    for k in sorted(range(len(groups)), key=lambda k: quotas[k] - int(quotas[k]), reverse=True):
        if left > 0 and counts[k] < len(groups[k]) - 1:
            counts[k], left = counts[k] + 1, left - 1
    test = [i for members, n in zip(groups, counts) for i in members[:n]]
    train = [i for members, n in zip(groups, counts) for i in members[n:]]
    if not test:
        raise DatasetError(f"too few examples ({len(data)}) to split off a test set; pass a separate test file")
    return data.subset(sorted(train)), data.subset(sorted(test))


def load_splits(train_path, test_path=None, text_column: str = "text", label_column: str = "label",
                test_fraction: float = 0.2, seed: int = 0) -> tuple[LabelledText, LabelledText]:
    """Train and test splits: from two files, or a stratified `test_fraction` of the one file."""
    train = load_labelled(train_path, text_column, label_column)
    if test_path is None:
        return split(train, test_fraction, seed)
    return train, load_labelled(test_path, text_column, label_column, train.label_names)


def demo_dataset() -> tuple[LabelledText, LabelledText]:
    """The packaged English sentiment data set (positive / negative): 400 training and 120 test sentences."""
    return load_splits(DATA_DIR / "sentiment_train.jsonl", DATA_DIR / "sentiment_test.jsonl")
