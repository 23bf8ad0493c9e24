"""Labelled text for sequence classification, read from .csv or .jsonl files.

Labels are names; ids follow the sorted names of the training split, and every other split must use only those
names. Every problem with a file is a `DatasetError` that names the file (and line, column or label).
"""
import csv
import json
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


def _csv_rows(path: Path):
    """(line number, row dict) per data row, and the header's column names."""
    with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: a byte order mark is not part of a name
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        return [(reader.line_num, row) for row in reader], columns


def _jsonl_rows(path: Path):
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


def read_rows(path, text_column: str = "text", label_column: str = "label") -> tuple[list[str], list[str]]:
    """(texts, label names) from a .csv (with a header) or .jsonl (one object a line) file."""
    path = Path(path)
    if path.suffix not in FORMATS:
        raise DatasetError(f"{path}: unsupported file type {path.suffix!r}; expected one of {FORMATS}")
    if not path.is_file():
        raise DatasetError(f"data file not found: {path}")
    rows, columns = (_csv_rows if path.suffix == ".csv" else _jsonl_rows)(path)
    if not rows:
        raise DatasetError(f"{path}: the file has no data rows")
    texts, labels = [], []
    for line_num, row in rows:
        for column in (text_column, label_column):
            if row.get(column) is None:
                where = f"line {line_num} has no" if column in columns else "no"
                raise DatasetError(f"{path}: {where} column {column!r}; the columns are {columns}")
        text = row[text_column]
        if not isinstance(text, str):
            raise DatasetError(f"{path}: line {line_num}: {text_column!r} must be a string, got {text!r}")
        texts.append(text)
        labels.append(str(row[label_column]))
    return texts, labels


def load_labelled(path, text_column: str = "text", label_column: str = "label",
                  label_names: list[str] | None = None) -> LabelledText:
    """Read a file; label ids come from `label_names` (e.g. the training split's) or from this file's sorted names."""
    texts, names = read_rows(path, text_column, label_column)
    label_names = label_names if label_names is not None else sorted(set(names))
    ids = {name: i for i, name in enumerate(label_names)}
    unknown = sorted(set(names) - set(ids))
    if unknown:
        raise DatasetError(f"{path}: unknown label(s) {unknown} in column {label_column!r}; "
                           f"the training labels are {label_names}")
    return LabelledText(texts, [ids[n] for n in names], label_names)


def split(data: LabelledText, test_fraction: float, seed: int = 0) -> tuple[LabelledText, LabelledText]:
    """Stratified train/test split; every label keeps at least one training example."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = random.Random(seed)
    train, test = [], []
    for label in range(len(data.label_names)):
        members = [i for i, y in enumerate(data.labels) if y == label]
        rng.shuffle(members)
        n_test = min(round(test_fraction * len(members)), len(members) - 1)
        test += members[:n_test]
        train += members[n_test:]
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
