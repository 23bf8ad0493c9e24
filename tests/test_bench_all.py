"""Dry run of `bench.all` (what `bench/gpu.sh` runs on CUDA) on the CPU at tiny sizes: every benchmark of its list
writes its JSON and PNG under the documented names, the summary names every run, and a failing run is reported
without stopping the others."""
import datetime
import json

import pytest

from bench import all as bench_all
from bench import lora

SCHEMA = {"op", "device", "device_name", "dtype", "shape", "params", "torch", "triton", "results", "ratios"}


def expected_stems(device: str) -> list[str]:
    today = datetime.date.today().isoformat()
    return [f"{op}-{device}-{today}{variant}" for op, variant, _ in bench_all.RUNS[device]]


def test_the_cpu_dry_run_writes_every_benchmark_under_its_name(tmp_path, capsys):
    status = bench_all.main(["--device", "cpu", "--quick", "--no-tests", "--out", str(tmp_path)])

    assert status == 0
    stems = expected_stems("cpu")
    assert len(set(stems)) == len(stems) == 7  # LoRA and adapters with / without dropout, 2 densities, e2e
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{s}{ext}" for s in stems for ext in (".json", ".png"))
    for stem in stems:
        report = json.loads((tmp_path / f"{stem}.json").read_text())
        assert SCHEMA <= set(report), stem
        assert (report["device"], report["dtype"]) == ("cpu", "float32"), stem
        assert stem.startswith(report["op"] + "-"), stem
        assert all({"fwd_ms", "fwd_bwd_ms", "saved_bytes", "peak_bytes"} <= set(r) for r in report["results"].values())
    densities = [json.loads((tmp_path / f"{s}.json").read_text())["params"]["density"] for s in stems
                 if s.startswith("sparse_delta")]
    assert densities == [0.005, 0.05]
    summary = capsys.readouterr().out.rsplit("| run |", 1)[1]
    for op, variant, _ in bench_all.RUNS["cpu"]:
        assert f"| {op}{variant} | " in summary
    assert "FAILED" not in summary


def test_a_failing_benchmark_is_reported_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_all, "RUNS", {"cpu": [("lora", "", ["--shape", "1,1,1"]),
                                                     ("lora", "-p0", ["--shape", "1,1,1", "--dropout", "0"])]})
    calls = []

    def broken_then_real(argv):
        calls.append(argv)
        if len(calls) == 1:
            raise RuntimeError("the first run breaks")
        return real_main(argv)

    real_main = lora.main
    monkeypatch.setattr(lora, "main", broken_then_real)
    assert bench_all.main(["--device", "cpu", "--quick", "--no-tests", "--out", str(tmp_path)]) == 1
    summary = capsys.readouterr().out.rsplit("| run |", 1)[1]
    assert "| lora | FAILED |" in summary and "| lora-p0 | fastpeft/base" in summary
    assert any("-p0.json" in p.name for p in tmp_path.iterdir())


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_each_run_gets_the_device_dtype_and_its_own_files(device):
    args = bench_all.parse_args(["--device", device, "--out", "results"])
    argvs = [bench_all.run_argv(op, variant, flags, args) for op, variant, flags in bench_all.RUNS[device]]
    outputs = [argv[argv.index("--json") + 1] for argv in argvs]
    assert len(set(outputs)) == len(outputs)
    for argv in argvs:
        assert argv[argv.index("--dtype") + 1] == {"cuda": "bfloat16", "cpu": "float32"}[device]
        assert argv[argv.index("--device") + 1] == device
    if device == "cuda":  # the README's GPU size for LoRA, and bounded repeats for the 8-minute budget
        assert argvs[0][argvs[0].index("--shape") + 1] == "8192,4096,4096"
        assert all(argv[argv.index("--repeats") + 1] == "30" for argv in argvs)
