"""`fastpeft train` for the methods with their own run: --method multitask (several tasks' files, one per --task, of
each kind, on a shared LoRA-adapted encoder) and --method trainable_tokens (a vocabulary extended from a domain
corpus, the new rows trained beside LoRA): each trains MiniLM, saves, reloads into a fresh model and agrees; bad
options are usage errors before any training."""
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from fastpeft.cli import main
from fastpeft.datasets import DATA_DIR
from tests.model_cases import MINILM_DIR, one_thread  # noqa: F401  (autouse fixture)
from tests.test_cli import NEGATIVE, POSITIVE, usage_error, write_csv

FAST = ["--test-fraction", "0.25", "--epochs", "2", "--batch-size", "8", "--max-length", "24", "--r", "4", "--target-modules", "query,value"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture
def task_files(tmp_path) -> dict[str, Path]:
    """A sentiment classification, a regression on the number of words, and word tagging (long / short)."""
    texts = POSITIVE + NEGATIVE
    return {
        "sentiment": write_jsonl(tmp_path / "sentiment.jsonl", [{"text": t, "label": "pos"} for t in POSITIVE] +
                                 [{"text": t, "label": "neg"} for t in NEGATIVE]),
        "words": write_jsonl(tmp_path / "words.jsonl", [{"text": t, "label": len(t.split()) / 4} for t in texts]),
        "long": write_jsonl(tmp_path / "long.jsonl", [{"text": t.split(), "label": ["long" if len(w) > 5 else "short"
                                                                                   for w in t.split()]}
                                                      for t in texts]),
    }


def multitask_argv(task_files, out, *extra) -> list[str]:
    return ["train", "--model", MINILM_DIR, "--method", "multitask", "--output-dir", str(out),
            "--task", f"sentiment={task_files['sentiment']}", "--task", f"words:regression={task_files['words']}",
            "--task", f"long:token_classification={task_files['long']}", *extra]


def test_multitask_trains_every_kind_of_task_on_a_lora_encoder_saves_and_reloads(tmp_path, task_files, capsys):
    out = tmp_path / "out"
    assert main(multitask_argv(task_files, out, *FAST)) == 0
    printed = capsys.readouterr().out
    assert "sentiment (classification: 12 train / 4 test)" in printed
    assert "long (token_classification: 12 train / 4 test)" in printed
    assert "reloaded adapters predict the same: ok" in printed
    weights = printed.split("learned task weights exp(-s_t): ")[1].splitlines()[0]
    assert {part.split()[0] for part in weights.split(", ")} == {"sentiment", "words", "long"}
    assert all(float(part.split()[1]) != 1.0 for part in weights.split(", "))  # every s_t has moved
    assert json.loads((out / "adapters.json").read_text())["adapters"] == ["encoder", "tasks"]
    tasks = json.loads((out / "tasks" / "adapter_config.json").read_text())["tasks"]
    assert tasks == {"sentiment": {"kind": "classification", "num_labels": 2},
                     "words": {"kind": "regression", "num_labels": 1},
                     "long": {"kind": "token_classification", "num_labels": 2}}
    lora = json.loads((out / "encoder" / "adapter_config.json").read_text())
    assert lora["peft_type"] == "LORA" and lora["r"] == 4
    assert any(".lora_A." in key for key in load_file(out / "encoder" / "adapter_model.safetensors"))


def test_multitask_with_a_frozen_encoder_trains_the_heads_only(tmp_path, task_files, capsys):
    out = tmp_path / "out"
    argv = multitask_argv(task_files, out, "--encoder-method", "none", "--epochs", "1", "--max-length", "24",
                          "--sampling", "temperature", "--temperature", "3")
    assert main(argv) == 0
    assert "encoder: none" in capsys.readouterr().out
    assert json.loads((out / "adapters.json").read_text())["adapters"] == ["tasks"]


@pytest.mark.parametrize("extra, message", [
    (["--task", "oops"], "a task is NAME[:KIND]=PATH"),
    (["--task", "a:ranking=x.csv"], "KIND must be one of"),
    (["--task", "a=x.csv", "--task", "a=y.csv"], "--task names must differ; ['a']"),
    (["--data", "x.csv", "--task", "a=x.csv"], "takes its data as --task"),
    ([], "takes its data as --task"),
    (["--task", "a=missing.csv"], "data file not found: missing.csv"),
    (["--task", "a:token_classification=words.csv"], "token_classification data must be .jsonl"),
    (["--task", "a=x.csv", "--encoder-method", "lorra"], "--encoder-method must be another of"),
    (["--task", "a=x.csv", "--encoder-method", "multitask"], "--encoder-method must be another of"),
    (["--task", "a=x.csv", "--encoder-method", "none", "--r", "4"], "--r does not apply to --method multitask"),
    (["--task", "a=x.csv", "--density", "0.1"], "--density does not apply to --method multitask"),
])
def test_bad_multitask_options_are_usage_errors(capsys, tmp_path, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    write_csv(tmp_path / "x.csv", [("good", "pos"), ("bad", "neg")] * 4)
    write_csv(tmp_path / "words.csv", [("good", "pos"), ("bad", "neg")] * 4)
    err = usage_error(capsys, ["train", "--model", MINILM_DIR, "--method", "multitask", "--output-dir", "out", *extra])
    assert message in err
    assert not (tmp_path / "out").exists()


def test_a_regression_label_that_is_no_number_names_the_row(capsys, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a", "label": 1.5}, {"text": "b", "label": "high"}] * 3)
    err = usage_error(capsys, ["train", "--model", MINILM_DIR, "--method", "multitask", "--output-dir",
                               str(tmp_path / "out"), "--task", f"score:regression={bad}"])
    assert f"{bad}: data row 2: a regression label must be a finite number, got 'high'" in err


def test_trainable_tokens_extends_the_vocabulary_trains_the_new_rows_with_lora_and_reloads(tmp_path, capsys):
    data = write_csv(tmp_path / "reviews.csv", [(t, "pos") for t in POSITIVE] + [(t, "neg") for t in NEGATIVE])
    out = tmp_path / "out"
    assert main(["train", "--model", MINILM_DIR, "--method", "trainable_tokens", "--data", str(data),
                 "--text-column", "review", "--label-column", "sentiment", "--corpus", str(DATA_DIR / "domain_corpus.txt"),
                 "--max-new", "8", "--output-dir", str(out), *FAST]) == 0
    printed = capsys.readouterr().out
    assert "8 new tokens: " in printed and "reloaded           max |diff|" in printed
    tokens = json.loads((out / "tokens" / "adapter_config.json").read_text())
    assert tokens["peft_type"] == "TRAINABLE_TOKENS" and len(tokens["token_indices"]) == 8
    assert min(tokens["token_indices"]) >= 30522  # new ids, after MiniLM's vocabulary
    tokenizer = json.loads((out / "tokenizer" / "tokenizer.json").read_text())
    assert len(tokenizer["added_tokens"]) >= 8
    lora = json.loads((out / "default" / "adapter_config.json").read_text())
    assert lora["peft_type"] == "LORA" and "classifier" in lora["modules_to_save"]


@pytest.mark.parametrize("extra, message", [
    (["--encoder-method", "none"], "none leaves the new head untrained"),
    (["--min-freq", "1000"], "corpus has no new word"),
    (["--corpus", "missing.txt"], "missing.txt"),
    (["--min-freq", "0"], "--min-freq: must be >= 1"),
])
def test_bad_trainable_tokens_options_are_usage_errors(capsys, tmp_path, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    data = write_csv(tmp_path / "x.csv", [(t, "pos") for t in POSITIVE] + [(t, "neg") for t in NEGATIVE])
    err = usage_error(capsys, ["train", "--model", MINILM_DIR, "--method", "trainable_tokens", "--data", str(data),
                               "--text-column", "review", "--label-column", "sentiment", "--output-dir", "out",
                               *extra])
    assert message in err
    assert not (tmp_path / "out").exists()
