"""`fastpeft compare`: every method trained the same way and measured; the table, JSON and plot it writes."""
import json

import pytest

from fastpeft import compare, methods
from fastpeft.cli import main, parse_args
from fastpeft.datasets import demo_dataset
from fastpeft.demo import packaged_model_dir
from tests.model_cases import one_thread  # noqa: F401  (autouse fixture)


def small(data, n):
    return data.subset(list(range(n)))


def test_compare_measures_each_method_and_writes_the_report(tmp_path, monkeypatch):
    train, test = demo_dataset()
    lora = methods.named("lora")
    monkeypatch.setattr(lora, "cli_config", lambda *a, **k: (_ for _ in ()).throw(ValueError("needs the API")))
    report = compare.run(packaged_model_dir(), small(train, 24), small(test, 8), tmp_path, epochs=1, batch_size=8,
                         max_length=16, names=["lora", "bottleneck", "bitfit"], log=lambda line: None)
    assert [r["method"] for r in report["rows"]] == ["bottleneck", "bitfit"]
    assert report["skipped"] == {"lora": "needs the API"}
    for row in report["rows"]:
        assert 0 < row["trainable"] < row["total"] and 0 <= row["accuracy"] <= 1 and row["step_ms"] > 0
        assert row["saved_activation_bytes"] > 0 and row["state_bytes"] == 16 * row["trainable"]
        assert row["gradient_bytes"] == 4 * row["trainable"]  # fp32 grads of exactly the trainable parameters
        assert row["file_bytes"] == sum(f.stat().st_size for f in (tmp_path / row["method"]).iterdir())
    assert json.loads((tmp_path / "compare.json").read_text()) == json.loads(json.dumps(report))
    assert (tmp_path / "compare.png").stat().st_size > 1000
    table = compare.markdown_table(report)
    assert "| bottleneck |" in table and "| bitfit |" in table and "skipped lora: needs the API" in table


def test_compare_command_line(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(compare, "run", lambda *a, **k: seen.update(k) or {"rows": [{}]})
    assert main(["compare", "--methods", "lora,bitfit", "--epochs", "1", "--output-dir", str(tmp_path / "c")]) == 0
    assert seen["names"] == ["lora", "bitfit"] and seen["epochs"] == 1
    assert parse_args(["compare"]).methods is None
    with pytest.raises(SystemExit):
        parse_args(["compare", "--methods", "lora,nope"])
