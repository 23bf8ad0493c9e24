"""Smoke test of `bench.adapter` on a tiny CPU shape: its JSON layout and its numbers."""
import json

import pytest

from bench import adapter

IMPL_KEYS = {"fwd_ms", "fwd_bwd_ms", "saved_bytes", "peak_bytes", "saved_bytes_all"}


@pytest.mark.parametrize("extra", [["--dropout", "0"], ["--dropout", "0.25", "--residual", "--activation", "gelu"]])
def test_adapter_bench_writes_the_documented_json(tmp_path, extra):
    argv = ["--shape", "48,24", "--bottleneck", "5", "--repeats", "2", "--warmup", "1", "--backend", "torch",
            "--json", f"{tmp_path}/", "--plot", str(tmp_path / "adapter.png"), *extra]
    report = adapter.main(argv)

    (written,) = tmp_path.glob("adapter-cpu-*.json")
    assert json.loads(written.read_text()) == report
    assert (tmp_path / "adapter.png").stat().st_size > 0
    assert set(report) == {"op", "device", "device_name", "dtype", "shape", "params", "torch", "triton", "results",
                           "ratios"}
    assert (report["op"], report["device"], report["dtype"]) == ("adapter", "cpu", "float32")
    assert report["shape"] == {"M": 48, "D": 24}
    assert report["params"]["backend"] == "torch" and report["params"]["bottleneck"] == 5
    assert report["params"]["residual"] == ("--residual" in extra)
    assert set(report["results"]) == {"copy", "reference", "fastpeft"}
    for impl, result in report["results"].items():
        assert set(result) == IMPL_KEYS, impl
        assert result["fwd_ms"] > 0 and result["fwd_bwd_ms"] > 0, impl
        assert result["peak_bytes"] is None, impl
        assert 0 <= result["saved_bytes"] <= result["saved_bytes_all"], impl
    assert report["results"]["copy"]["saved_bytes_all"] == 0
    # fastpeft keeps no [M, D] activation: only an [M, m (+1)] bottleneck tensor and the [D, m + 1] [w_up | b_up].
    assert report["results"]["fastpeft"]["saved_bytes"] < 48 * 24 * 4
    assert all(value > 0 for key, value in report["ratios"].items() if "/" in key)
