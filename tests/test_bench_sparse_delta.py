"""Smoke test of `bench.sparse_delta` on a tiny CPU shape: its JSON layout and its numbers."""
import json

import pytest

from bench import sparse_delta

IMPL_KEYS = {"fwd_ms", "fwd_bwd_ms", "saved_bytes", "peak_bytes", "saved_bytes_all", "grad_ms"}


@pytest.mark.parametrize("backend", ["torch", "ext"])
def test_sparse_delta_bench_writes_the_documented_json(tmp_path, backend):
    argv = ["--shape", "48,24,40", "--density", "0.05", "--repeats", "2", "--warmup", "1", "--backend", backend,
            "--json", f"{tmp_path}/", "--plot", str(tmp_path / "sparse_delta.png")]
    report = sparse_delta.main(argv)

    (written,) = tmp_path.glob("sparse_delta-cpu-*.json")
    assert json.loads(written.read_text()) == report
    assert (tmp_path / "sparse_delta.png").stat().st_size > 0
    assert set(report) == {"op", "device", "device_name", "dtype", "shape", "params", "torch", "triton", "results",
                           "ratios"}
    assert (report["op"], report["device"], report["dtype"]) == ("sparse_delta", "cpu", "float32")
    assert report["shape"] == {"M": 48, "K": 24, "N": 40}
    assert report["params"]["backend"] == backend and report["params"]["unsupported"] == {}
    assert (report["params"]["nnz"], report["params"]["index_dtype"]) == (48, "int32")  # round(0.05 * 40 * 24)
    assert set(report["results"]) == {"base", "dense", "torch_sampled", "fastpeft_sddmm", "fastpeft"}
    for impl, result in report["results"].items():
        assert set(result) == IMPL_KEYS, impl
        assert result["fwd_ms"] > 0 and result["fwd_bwd_ms"] > 0, impl
        assert result["peak_bytes"] is None, impl
        assert 0 <= result["saved_bytes"] <= result["saved_bytes_all"], impl
        assert (result["grad_ms"] is None) == (impl in ("base", "fastpeft")), impl
    # fastpeft's forward keeps nothing beyond its inputs: x, the weight and the indices (int32).
    assert report["results"]["fastpeft"]["saved_bytes"] == 48 * 4
    ratios = report["ratios"]
    # 48 nonzeros x (4 fp32 words + int32 index + fp32 W0 value) against 960 entries x 4 fp32 words.
    assert (ratios["trainable_state_bytes"], ratios["dense_diff_state_bytes"]) == (48 * 24, 960 * 16)
    assert ratios["trainable_state/dense_diff"] == pytest.approx(48 * 24 / (960 * 16))
    assert ratios["target_met:trainable_state/dense_diff"] is False  # 7.5% at density 0.05
    assert all(value > 0 for key, value in ratios.items() if "/" in key and not key.startswith("target_met"))


def test_a_wrong_values_gradient_aborts_the_run(monkeypatch):
    monkeypatch.setattr(sparse_delta, "sddmm", lambda a, b, indices, backend=None: a.new_zeros(indices.shape))
    with pytest.raises(RuntimeError, match="fastpeft_sddmm values' gradient disagrees with the float64 reference"):
        sparse_delta.main(["--shape", "16,8,8", "--density", "0.25", "--repeats", "1", "--warmup", "0"])


def test_an_implementation_that_cannot_run_is_left_out_and_named():
    report = sparse_delta.main(["--shape", "16,8,8", "--density", "0.25", "--dtype", "bfloat16", "--repeats", "1",
                                "--warmup", "0"])
    assert set(report["params"]["unsupported"]) == {"torch_sampled"}  # no CPU bf16 sampled_addmm in torch
    assert "torch_sampled" not in report["results"]
    assert report["ratios"]["sddmm_speedup_over_torch_sampled"] is None
    assert report["ratios"]["target_met:sddmm_speedup_over_torch_sampled"] is None
    assert report["ratios"]["sddmm_speedup_over_dense"] > 0


@pytest.mark.parametrize("density", [0.005, 0.05])
def test_the_dense_and_sampled_addmm_peers_run_at_the_densities_the_gpu_script_uses(density):
    report = sparse_delta.main(["--shape", "40,50,80", "--density", str(density), "--repeats", "1", "--warmup", "0"])
    assert report["params"]["nnz"] == round(density * 80 * 50) and report["params"]["unsupported"] == {}
    # The dense peer trains the whole weight: its step computes dW = dy^T x; sampled_addmm runs on CPU in fp32.
    for peer in ("dense", "torch_sampled"):
        assert report["results"][peer]["grad_ms"] > 0 and report["results"][peer]["fwd_bwd_ms"] > 0
        assert report["ratios"][f"sddmm_speedup_over_{peer}"] > 0
    assert report["results"]["dense"]["saved_bytes"] == 0  # it keeps x and its weight, both alive anyway
