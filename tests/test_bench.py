"""Smoke test of the benchmark machinery: `bench.lora` on a tiny CPU shape, its JSON layout and its numbers."""
import json

import pytest

from bench import common, lora

IMPL_KEYS = {"fwd_ms", "fwd_bwd_ms", "saved_bytes", "peak_bytes", "saved_bytes_all"}


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_lora_bench_writes_the_documented_json(tmp_path, dropout):
    argv = ["--shape", "64,24,40", "--rank", "4", "--dropout", str(dropout), "--repeats", "2", "--warmup", "1",
            "--backend", "torch", "--json", f"{tmp_path}/", "--plot", str(tmp_path / "lora.png")]
    report = lora.main(argv)

    (written,) = tmp_path.glob("lora-cpu-*.json")
    assert json.loads(written.read_text()) == report
    assert (tmp_path / "lora.png").stat().st_size > 0
    assert set(report) == {"op", "device", "device_name", "dtype", "shape", "params", "torch", "triton", "results",
                           "ratios"}
    assert (report["op"], report["device"], report["dtype"]) == ("lora", "cpu", "float32")
    assert report["shape"] == {"M": 64, "K": 24, "N": 40}
    assert report["params"]["backend"] == "torch" and report["params"]["dropout"] == dropout
    assert set(report["results"]) == {"base", "reference", "fastpeft", "peft"}
    for impl, result in report["results"].items():
        assert set(result) == IMPL_KEYS, impl
        assert result["fwd_ms"] > 0 and result["fwd_bwd_ms"] > 0, impl
        assert result["peak_bytes"] is None, impl
        assert 0 <= result["saved_bytes"] <= result["saved_bytes_all"], impl
    # fastpeft keeps the [M, r] shrink beyond what the base layer keeps, or nothing where fp32 without dropout runs
    # on the folded weight (the backward recomputes the shrink); PEFT also keeps a dropped copy of x.
    assert report["ratios"]["shrink_bytes"] == 64 * 4 * 4
    assert report["ratios"]["saved_extra_over_base_bytes"] == (64 * 4 * 4 if dropout else 0)
    if dropout:
        assert report["results"]["peft"]["saved_bytes"] >= 64 * 24 * 4
    assert all(value > 0 for key, value in report["ratios"].items() if "/" in key)


def test_saved_bytes_counts_each_storage_once_and_excludes_alive_tensors():
    import torch

    x = torch.randn(8, 4, requires_grad=True)
    extra, everything = common.saved_bytes(lambda: (x.exp() * x.exp()).sum(), alive=[x])
    # exp saves its result (twice here: two distinct storages); mul saves both factors (the same two storages).
    assert (extra, everything) == (2 * 8 * 4 * 4, 2 * 8 * 4 * 4)
    extra, everything = common.saved_bytes(lambda: (x * x).sum(), alive=[x])
    assert (extra, everything) == (0, 8 * 4 * 4)
