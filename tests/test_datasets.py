"""Loading labelled text from .csv / .jsonl, the label vocabulary, splits, the packaged data and every error."""
import json

import pytest

from fastpeft.datasets import DatasetError, demo_dataset, load_labelled, load_splits, read_rows, split


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_and_csv_read_alike(tmp_path):
    rows = [{"review": "Great, really great", "stars": "good"}, {"review": 'Awful "film"', "stars": "bad"}]
    jsonl = write_jsonl(tmp_path / "d.jsonl", rows)
    csv = write_csv(tmp_path / "d.csv", 'review,stars\n"Great, really great",good\n"Awful ""film""",bad\n')
    for path in (jsonl, csv):
        data = load_labelled(path, "review", "stars")
        assert data.texts == ["Great, really great", 'Awful "film"']
        assert data.label_names == ["bad", "good"]  # sorted names -> ids
        assert data.labels == [1, 0]


def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    for name, text in (("d.csv", "text,label\nfine,good\n"), ("d.jsonl", '{"text": "fine", "label": "good"}\n')):
        path = tmp_path / name
        path.write_text(text, encoding="utf-8-sig")  # as spreadsheet programs write it
        assert read_rows(path, "text", "label") == (["fine"], ["good"])


def test_blank_jsonl_lines_are_skipped_and_numeric_labels_become_names(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": 1}\n\n{"text": "b", "label": 0}\n', encoding="utf-8")
    data = load_labelled(path)
    assert data.label_names == ["0", "1"] and data.labels == [1, 0]


def test_test_split_uses_training_label_ids(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "x", "label": "b"}, {"text": "y", "label": "c"}])
    test = write_jsonl(tmp_path / "test.jsonl", [{"text": "z", "label": "c"}])
    train_data, test_data = load_splits(train, test)
    assert test_data.label_names == ["b", "c"] and test_data.labels == [1]


def test_unknown_test_label_is_named_with_its_file(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "x", "label": "pos"}, {"text": "y", "label": "neg"}])
    test = write_jsonl(tmp_path / "test.jsonl", [{"text": "z", "label": "neutral"}])
    with pytest.raises(DatasetError, match=r"test\.jsonl.*unknown label.*'neutral'.*\['neg', 'pos'\]"):
        load_splits(train, test)


def test_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="not found.*nope.csv"):
        read_rows(tmp_path / "nope.csv")


def test_unsupported_suffix(tmp_path):
    path = write_csv(tmp_path / "d.tsv", "text\tlabel\n")
    with pytest.raises(DatasetError, match=r"unsupported file type '\.tsv'"):
        read_rows(path)


@pytest.mark.parametrize("content", ["", "text,label\n"])
def test_empty_csv(tmp_path, content):
    with pytest.raises(DatasetError, match="d.csv: the file has no data rows"):
        read_rows(write_csv(tmp_path / "d.csv", content))


def test_empty_jsonl(tmp_path):
    with pytest.raises(DatasetError, match="no data rows"):
        read_rows(write_csv(tmp_path / "d.jsonl", "\n\n"))


def test_missing_column_lists_the_columns(tmp_path):
    path = write_csv(tmp_path / "d.csv", "sentence,label\nhello,a\n")
    with pytest.raises(DatasetError, match=r"no column 'text'; the columns are \['sentence', 'label'\]"):
        read_rows(path)
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "sentiment": "x"}])
    with pytest.raises(DatasetError, match=r"no column 'label'; the columns are \['text', 'sentiment'\]"):
        read_rows(path)


def test_column_missing_on_a_later_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "x"}, {"text": "b"}])
    with pytest.raises(DatasetError, match="line 2 has no column 'label'"):
        read_rows(path)


def test_bad_json_line_is_numbered(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{"text": "b", label: y}\n', encoding="utf-8")
    with pytest.raises(DatasetError, match="line 2 is not valid JSON"):
        read_rows(path)


def test_jsonl_line_must_be_an_object(tmp_path):
    path = write_csv(tmp_path / "d.jsonl", '["a", "x"]\n')
    with pytest.raises(DatasetError, match="line 1 must be a JSON object, got list"):
        read_rows(path)


def test_text_must_be_a_string(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": 3, "label": "x"}])
    with pytest.raises(DatasetError, match="line 1: 'text' must be a string"):
        read_rows(path)


def test_split_is_stratified_and_keeps_every_label_in_train(tmp_path):
    rows = [{"text": f"t{i}", "label": "a" if i < 20 else "b"} for i in range(22)]
    data = load_labelled(write_jsonl(tmp_path / "d.jsonl", rows))
    train, test = split(data, 0.25, seed=1)
    assert sorted(train.texts + test.texts) == sorted(data.texts)
    # 0.25 * 22 = 5.5 -> 6 test rows: 5 of the 20 "a", and the largest remainder (0.5) gives one of the 2 "b"
    assert test.labels.count(0) == 5 and test.labels.count(1) == 1
    assert set(train.labels) == {0, 1}
    with pytest.raises(ValueError, match="test_fraction"):
        split(data, 1.0)


@pytest.mark.parametrize("fraction, expected", [(0.1, 1), (0.2, 2), (0.5, 5), (0.75, 8)])
def test_split_rounds_the_whole_test_set_not_each_label(tmp_path, fraction, expected):
    rows = [{"text": f"t{i}", "label": "xy"[i % 2]} for i in range(10)]
    train, test = split(load_labelled(write_jsonl(tmp_path / "d.jsonl", rows)), fraction)
    assert len(test) == expected and len(train) == 10 - expected  # 0.75: 8, each label keeps one of its 5
    assert abs(test.labels.count(0) - test.labels.count(1)) <= 1


def test_split_of_too_little_data(tmp_path):
    data = load_labelled(write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}]))
    with pytest.raises(DatasetError, match="too few examples"):
        split(data, 0.2)


def test_labels_are_normalised_names(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 1.0},
                                             {"text": "c", "label": " 2 "}, {"text": "d", "label": True}])
    data = load_labelled(path)
    assert data.label_names == ["1", "2", "True"] and data.labels == [0, 0, 1, 2]
    data = load_labelled(write_csv(tmp_path / "d.csv", "text,label\na, pos\nb,pos \nc,neg\n"))
    assert data.label_names == ["neg", "pos"] and data.labels == [1, 1, 0]


@pytest.mark.parametrize("name, content, message", [
    ("d.csv", "text,label\na,x\nb,\n", "line 3: empty label in column 'label'"),
    ("d.csv", "text,label\na,x\nb,  \n", "line 3: empty label"),
    ("d.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": null}\n', "line 2: empty label"),
    ("d.jsonl", '{"text": "a", "label": [1]}\n', "line 1: 'label' must be a string, number or boolean, got \\[1\\]"),
    ("d.jsonl", '{"text": "a", "label": NaN}\n', "line 1: 'label' must be a string, number or boolean, got nan"),
])
def test_bad_labels_are_named_with_their_line(tmp_path, name, content, message):
    with pytest.raises(DatasetError, match=message):
        read_rows(write_csv(tmp_path / name, content))


def test_one_label_is_not_a_classification_task(tmp_path):
    """transformers would train a one-logit regression head, whose accuracy is always 100%."""
    path = write_csv(tmp_path / "d.csv", "text,label\na,spam\nb,spam\n")
    with pytest.raises(DatasetError, match="d.csv: column 'label' holds one label, 'spam'; .* at least two"):
        load_splits(path)


def test_demo_dataset_is_balanced_and_disjoint():
    train, test = demo_dataset()
    assert len(train) >= 350 and len(test) >= 100
    assert train.label_names == test.label_names == ["negative", "positive"]
    for data in (train, test):
        assert abs(data.labels.count(0) - data.labels.count(1)) <= len(data) // 10
        assert len(set(data.texts)) == len(data)
    assert not {t.lower() for t in train.texts} & {t.lower() for t in test.texts}
