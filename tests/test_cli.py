"""The `fastpeft` command: `train` end to end on a tiny csv (in a subprocess, through `python -m fastpeft`), and its
argument errors (exit status 2, with a message that says what is wrong)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastpeft import demo
from fastpeft.cli import main
from fastpeft.demo import packaged_model_dir
from fastpeft import DiffPruningConfig
from fastpeft.methods.diff_pruning.method import DEMO_DENSITY

ROOT = Path(__file__).resolve().parents[1]
POSITIVE = ["I loved it.", "Wonderful service and great food.", "A delightful, clever film.", "Works perfectly.",
            "Best purchase this year.", "The staff were kind and helpful.", "Beautiful and comfortable.",
            "Highly recommended to everyone."]
NEGATIVE = ["I hated it.", "Terrible service and cold food.", "A dull, clumsy film.", "Broke after a day.",
            "Worst purchase this year.", "The staff were rude and slow.", "Ugly and uncomfortable.",
            "Avoid it at all costs."]


def write_csv(path: Path, rows) -> Path:
    lines = ["review,sentiment"] + [f'"{text}",{label}' for text, label in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def tiny_csv(tmp_path) -> Path:
    return write_csv(tmp_path / "reviews.csv", [(t, "pos") for t in POSITIVE] + [(t, "neg") for t in NEGATIVE])


def test_train_end_to_end(tmp_path, tiny_csv):
    out = tmp_path / "adapter"
    command = [sys.executable, "-m", "fastpeft", "train", "--model", str(packaged_model_dir()), "--data", str(tiny_csv),
               "--text-column", "review", "--label-column", "sentiment", "--output-dir", str(out), "--epochs", "1",
               "--batch-size", "4", "--max-length", "32", "--target-modules", "query,value", "--test-fraction", "0.25"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "data: 12 train / 4 test examples, labels ['neg', 'pos']" in done.stdout
    assert "HF PEFT" in done.stdout and "all checks passed" in done.stdout
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and sorted(config["target_modules"]) == ["query", "value"]
    assert config["modules_to_save"] == ["classifier", "pre_classifier", "score"]
    assert (out / "adapter_model.safetensors").is_file()


def run_train(capsys, *args) -> str:
    """Run `fastpeft train` with `args`, expect exit status 2 and return its error message."""
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--model", str(packaged_model_dir()), "--output-dir", "unused", *args])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_missing_column_lists_the_columns(capsys, tiny_csv):
    err = run_train(capsys, "--data", str(tiny_csv), "--label-column", "sentiment")
    assert "no column 'text'; the columns are ['review', 'sentiment']" in err


def test_empty_file(capsys, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "empty.jsonl: the file has no data rows" in run_train(capsys, "--data", str(empty))


def test_unknown_test_label(capsys, tmp_path, tiny_csv):
    test = write_csv(tmp_path / "test.csv", [("Fine, I guess.", "neutral")])
    err = run_train(capsys, "--data", str(tiny_csv), "--test-data", str(test), "--text-column", "review",
                    "--label-column", "sentiment")
    assert "test.csv: unknown label(s) ['neutral']" in err


def test_missing_data_file(capsys, tmp_path):
    assert "data file not found" in run_train(capsys, "--data", str(tmp_path / "missing.csv"))


def test_not_a_model_directory(capsys, tmp_path, tiny_csv):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--model", str(tmp_path), "--data", str(tiny_csv), "--output-dir", "unused"])
    assert exit_info.value.code == 2 and "has no config.json" in capsys.readouterr().err


def test_bad_lora_settings(capsys, tiny_csv):
    assert "lora_dropout" in run_train(capsys, "--data", str(tiny_csv), "--lora-dropout", "1.5")
    assert "must be >= 1" in run_train(capsys, "--data", str(tiny_csv), "--r", "0")


def test_settings_that_do_not_fit_the_model_are_usage_errors_before_any_work(capsys, tiny_csv, monkeypatch):
    monkeypatch.setattr("fastpeft.training.evaluate", lambda *a, **k: pytest.fail("evaluated before the check"))
    err = run_train(capsys, "--data", str(tiny_csv), "--text-column", "review", "--label-column", "sentiment",
                    "--test-fraction", "0.25", "--target-modules", "query,valu")
    assert "does not fit" in err and "entries ['valu'] match no module of BertForSequenceClassification" in err
    assert "--lr: must be a finite number > 0, got -1.0" in run_train(capsys, "--data", str(tiny_csv), "--lr", "-1")


def test_bad_diff_settings(capsys, tiny_csv):
    for bad in ("0", "1.5", "nan"):
        assert "--density: must be in (0, 1]" in run_train(capsys, "--data", str(tiny_csv), "--method", "diff_pruning",
                                                             "--density", bad)
    assert "--search-epochs: must be >= 1" in run_train(capsys, "--data", str(tiny_csv), "--search-epochs", "0")


def usage_error(capsys, argv) -> str:
    """Run `fastpeft` with `argv`, expect exit status 2 and return its error message."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.fixture
def no_work(monkeypatch):
    """Any data loading, training or demo run fails the test: the error must come before all of them."""
    for name in ("fastpeft.cli.load_splits", "fastpeft.demo.run", "fastpeft.demo.run_demo"):
        monkeypatch.setattr(name, lambda *a, **k: pytest.fail("work started before the argument check"))


@pytest.mark.parametrize("command", ["train", "demo"])
def test_unusable_output_dir_is_refused_before_any_work(capsys, tmp_path, tiny_csv, monkeypatch, no_work, command):
    def refused(out) -> str:
        given = ["--model", str(packaged_model_dir()), "--data", str(tiny_csv)] if command == "train" else []
        return usage_error(capsys, [command, *given, "--output-dir", str(out)])

    a_file = tmp_path / "adapter.bin"
    a_file.write_text("")
    assert f"argument --output-dir: {str(a_file)!r} exists and is not a directory" in refused(a_file)
    assert f"argument --output-dir: cannot create {str(a_file / 'adapter')!r}: {a_file} is not a directory" \
        in refused(a_file / "adapter")
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != read_only)  # as chmod would, even for root
    assert f"argument --output-dir: cannot write to {read_only} (no write permission)" in refused(read_only)
    assert f"argument --output-dir: cannot write to {read_only} (no write permission)" in refused(read_only / "a/b")


def test_output_dir_may_be_new_or_an_existing_directory(tmp_path):
    from fastpeft.cli import parse_args
    assert parse_args(["demo", "--output-dir", str(tmp_path / "a" / "b")]).output_dir == tmp_path / "a" / "b"
    assert parse_args(["demo", "--output-dir", str(tmp_path)]).output_dir == tmp_path


@pytest.mark.parametrize("command", ["train", "demo"])
def test_devices_that_cannot_train_are_refused_up_front(capsys, tiny_csv, no_work, command):
    given = ["--model", str(packaged_model_dir()), "--data", str(tiny_csv), "--output-dir", "unused"]
    base = [command, *(given if command == "train" else [])]
    assert "argument --device: device 'meta' cannot train: meta tensors hold no data" in \
        usage_error(capsys, [*base, "--device", "meta"])
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU: absent on every machine
    assert f"argument --device: device {missing!r} is not usable here" in \
        usage_error(capsys, [*base, "--device", missing])


TRAIN_MISFITS = [("bottleneck", "--target-modules", "nope"), ("bottleneck", "--r", "4"),
                 ("bottleneck", "--lora-alpha", "8"), ("bottleneck", "--lora-dropout", "0.2"),
                 ("bottleneck", "--density", "0.1"), ("lora", "--placement", "pfeiffer"), ("lora", "--bottleneck", "8"),
                 ("lora", "--density", "0.1"), ("lora", "--search-epochs", "2"), ("diff_pruning", "--r", "4"),
                 ("diff_pruning", "--bottleneck", "8"), (None, "--density", "0.1")]


@pytest.mark.parametrize("method, flag, value", TRAIN_MISFITS)
def test_train_flags_of_another_method_are_usage_errors(capsys, tiny_csv, no_work, method, flag, value):
    chosen = ["--method", method] if method else []
    err = run_train(capsys, "--data", str(tiny_csv), *chosen, flag, value)
    assert f"{flag} does not apply to --method {method or 'lora'}" in err


@pytest.mark.parametrize("method, flag, value", [("bottleneck", "--r", "4"), ("diff_pruning", "--r", "4"),
                                                 ("lora", "--density", "0.1"), ("bottleneck", "--search-epochs", "2")])
def test_demo_flags_of_another_method_are_usage_errors(capsys, no_work, method, flag, value):
    err = usage_error(capsys, ["demo", "--method", method, flag, value])
    assert f"{flag} does not apply to --method {method}" in err


def test_method_flags_take_their_defaults_when_not_given():
    from fastpeft.cli import parse_args
    train = ["train", "--model", "m", "--data", "d.csv", "--output-dir", "unused"]
    assert parse_args(train).options == {"r": 8, "lora_alpha": 16.0, "lora_dropout": 0.1, "target_modules": "all-linear"}
    assert parse_args([*train, "--method", "bottleneck", "--bottleneck", "8"]).options == {"placement": "houlsby",
                                                                                         "bottleneck": 8}
    assert parse_args([*train, "--method", "diff_pruning", "--target-modules", "query"]).options == {
        "target_modules": ["query"], "search_epochs": 1, "density": DiffPruningConfig.density}
    assert parse_args(["demo", "--method", "diff_pruning"]).options == {"search_epochs": 1, "density": DEMO_DENSITY}


def test_train_method_diff_end_to_end(tmp_path, capsys, tiny_csv):
    """Both stages on the tiny csv: 3 search steps, projection to 5% per weight, 3 fixed-mask steps; then the
    unmerge / merge / reload / merge_and_unload checks."""
    out = tmp_path / "adapter"
    assert main(["train", "--method", "diff_pruning", "--search-epochs", "1", "--density", "0.05", "--model",
                 str(packaged_model_dir()), "--data", str(tiny_csv), "--text-column", "review", "--label-column",
                 "sentiment", "--output-dir", str(out), "--epochs", "1", "--batch-size", "4", "--max-length", "32",
                 "--target-modules", "query,value", "--test-fraction", "0.25"]) == 0
    printed = capsys.readouterr().out
    assert "diff pruning (density 0.05 per_weight, L0 search" in printed and "search: 3 steps" in printed
    assert "projected to a fixed mask: nnz 88,476 of 1,769,472 entries of 12 weights (density 0.0500)" in printed
    assert "HF PEFT comparison skipped: no HF PEFT run of diff pruning on this model" in printed
    assert all(f"  {name} " in printed for name in ("unmerged", "merged", "reloaded", "merge_and_unload"))
    assert "all checks passed" in printed
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["method"], config["density"], config["target_modules"]) == ("diff_pruning", 0.05,
                                                                               ["query", "value"])
    assert config["modules_to_save"] == ["classifier", "pre_classifier", "score"]


def test_demo_method_diff_is_wired_through(monkeypatch):
    """The full demo takes about a minute on CPU; its run is the one `train` above exercises."""
    cfg = demo.demo_config(method="diff_pruning", options={"search_epochs": 2, "density": 0.03})
    assert isinstance(cfg.config, DiffPruningConfig) and cfg.options["search_epochs"] == 2
    assert cfg.config.density == 0.03 and cfg.config.modules_to_save == ("classifier",)
    assert demo.demo_config(method="diff_pruning").config.density == DEMO_DENSITY
    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda **kwargs: seen.update(kwargs) or [])
    assert main(["demo", "--method", "diff_pruning", "--search-epochs", "2", "--density", "0.02"]) == 0
    assert (seen["method"], seen["options"]) == ("diff_pruning", {"search_epochs": 2, "density": 0.02})


def test_demo_needs_no_arguments_and_rejects_unknown_ones(capsys):
    from fastpeft.cli import parse_args
    args = parse_args(["demo"])
    assert (args.epochs, args.options, args.seed, args.device) == (2, {"r": 8}, 0, "cpu")
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--bogus"])
    assert exit_info.value.code == 2


def test_a_failed_check_exits_with_status_1(monkeypatch):
    monkeypatch.setattr(demo, "run_demo", lambda **kwargs: ["fine-tuning did not improve test accuracy"])
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--output-dir", "unused"])
    assert exit_info.value.code == 1


def test_check_agreement_flags_different_predictions_or_logits():
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    variants = {"same": logits.clone(), "close": logits + 1e-6, "drifted": logits + 1e-3,
                "flipped": logits.flip(-1)}
    failures = demo.check_agreement(logits, variants, log=lambda line: None)
    assert [f.split()[1] for f in failures] == ["drifted", "flipped"]
