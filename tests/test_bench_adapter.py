"""Smoke test of `bench.adapter` on a tiny CPU shape: its JSON layout and its numbers; and that its `plain` and
`floor` rows compute what they claim."""
import json

import pytest
import torch

from bench import adapter, common
from fastpeft.ops.adapter import bottleneck_adapter_ref

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
    assert set(report["results"]) == {"copy", "floor", "plain", "reference", "fastpeft"}
    for impl, result in report["results"].items():
        assert set(result) == IMPL_KEYS, impl
        assert result["fwd_ms"] > 0 and result["fwd_bwd_ms"] > 0, impl
        assert result["peak_bytes"] is None, impl
        assert 0 <= result["saved_bytes"] <= result["saved_bytes_all"], impl
    # The copy and the GEMM floor record no autograd graph.
    assert report["results"]["copy"]["saved_bytes_all"] == 0
    assert report["results"]["floor"]["saved_bytes_all"] == 0
    # fastpeft keeps no [M, D] activation: only an [M, m (+1)] bottleneck tensor and the [D, m + 1] [w_up | b_up].
    assert report["results"]["fastpeft"]["saved_bytes"] < 48 * 24 * 4
    # With dropout the plain modules keep [M, D] tensors (torch's mask and the dropped h for the down weight's grad).
    if report["params"]["dropout"] > 0:
        assert report["results"]["plain"]["saved_bytes"] >= 2 * 48 * 24 * 4
    ratios = report["ratios"]
    assert {"fastpeft/floor", "fastpeft/floor_fwd", "plain/fastpeft", "plain/fastpeft_fwd", "plain/floor",
            "reference/fastpeft", "fastpeft/copy"} <= set(ratios)
    assert ratios["fastpeft/floor"] == report["results"]["fastpeft"]["fwd_bwd_ms"] / report["results"]["floor"][
        "fwd_bwd_ms"]
    assert ratios["plain/fastpeft"] == report["results"]["plain"]["fwd_bwd_ms"] / report["results"]["fastpeft"][
        "fwd_bwd_ms"]
    assert all(value > 0 for key, value in ratios.items() if "/" in key)


def _problem(argv):
    args = adapter.parse_args(["--shape", "37,24", "--bottleneck", "6", *argv])
    device, dtype = common.setup(args)
    return adapter.Problem(args, device, dtype)


@pytest.mark.parametrize("argv", [[], ["--activation", "gelu", "--scaling", "0.5", "--residual"],
                                  ["--activation", "silu", "--scaling", "2", "--dropout", "0"]])
def test_plain_computes_fastpeft_reference_with_the_same_weights(argv):
    """The plain nn modules, dropout off, against fastpeft's reference on the very same parameters, in float64."""
    problem = _problem([*argv, "--dtype", "float32"])
    plain = problem.plain
    down, up = plain.adapter_down[0], plain.adapter_up
    # The plain modules hold the benchmark's parameters themselves, not copies.
    assert [down.weight, down.bias, up.weight, up.bias] == problem.params
    assert all(a is b for a, b in zip([down.weight, down.bias, up.weight, up.bias], problem.params))
    assert isinstance(down, torch.nn.Linear) and isinstance(up, torch.nn.Linear)
    assert isinstance(plain.dropout, torch.nn.Dropout) and plain.dropout.p == problem.dropout

    plain.double()  # the parameters themselves become float64; run every leaf in float64 to compare tightly
    for t in problem.leaves:
        t.data = t.data.double()
    problem.dy = problem.dy.double()
    out = problem.forward("plain", dropout=0.0)
    out.backward(problem.dy)
    got = [None if t is None else t.grad for t in problem.alive]
    problem.clear_grads()

    h, residual, w_down, b_down, w_up, b_up = problem.alive
    want_out = bottleneck_adapter_ref(h, w_down, b_down, w_up, b_up, problem.activation, problem.scaling, residual)
    want_out.backward(problem.dy)
    torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)
    for name, g, t in zip(("h", "residual", "w_down", "b_down", "w_up", "b_up"), got, problem.alive):
        if t is None:
            continue
        assert g is not None, name
        torch.testing.assert_close(g, t.grad, rtol=1e-12, atol=1e-12, msg=name)
    # A residual input takes the output's gradient directly, and h then only the adapter's.
    if residual is not None:
        torch.testing.assert_close(got[1], problem.dy)


def test_plain_dropout_acts_on_the_adapter_input_in_training():
    """With dropout, plain = h + up(act(down(dropout(h)))): torch's mask on the input, where fastpeft's sits."""
    problem = _problem(["--dropout", "0.5"])
    h, _, w_down, b_down, w_up, b_up = problem.alive
    with torch.no_grad():
        torch.manual_seed(1)
        out = problem.forward("plain")
        torch.manual_seed(1)
        dropped = torch.nn.functional.dropout(h, 0.5, training=True)  # the same draw of torch's generator
        assert 0 < (dropped != 0).float().mean().item() < 1
        want = h + torch.relu(dropped @ w_down.t() + b_down) @ w_up.t() + b_up
        torch.testing.assert_close(out, want)
    # The benchmark's check (dropout off) leaves the module dropping again for the timed rounds.
    problem.check(torch.float32)
    assert problem.plain.training and problem.plain.dropout.p == 0.5
    with torch.no_grad():
        assert not torch.equal(problem.forward("plain"), problem.forward("plain", dropout=0.0))


def test_floor_is_the_six_gemms_of_a_linear_bottleneck():
    """The floor's outputs are the forward and every gradient of y = (h W_down^T) W_up^T, the adapter's GEMMs."""
    problem = _problem([])
    x, w_down, w_up, dy = (t.double().requires_grad_() for t in problem.floor_operands)
    y = x.mm(w_down.t()).mm(w_up.t())
    y.backward(dy)
    pre, fwd_y = problem.floor(backward=False)
    # float32 results against float64 ones, to float32's tolerances.
    torch.testing.assert_close(pre, x.mm(w_down.t()).detach().float())
    torch.testing.assert_close(fwd_y, y.detach().float())
    got = problem.floor(backward=True)
    assert not any(t.requires_grad for t in got)
    for name, g, want in zip(("y", "dh", "dw_down", "dw_up"), got, (y, x.grad, w_down.grad, w_up.grad)):
        assert g.shape == want.shape, name
        torch.testing.assert_close(g, want.detach().float(), msg=name)
