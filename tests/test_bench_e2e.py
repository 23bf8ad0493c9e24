"""Smoke test of `bench.e2e` on a one-layer MiniLM and a tiny batch: its rows (every registered method shows up by
itself), its JSON layout, and that every implementation's step trains what it should and nothing else."""
import json

import pytest
import torch

from bench import e2e
from bench.e2e_models import base_model, batch, build
from fastpeft import methods

IMPL_KEYS = {"fwd_ms", "fwd_bwd_ms", "step_ms_q1", "step_ms_q3", "saved_bytes", "grad_bytes", "trainable",
             "peak_bytes", "peak_rss_bytes", "describe"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(report, the directory it was written to) of one quick run, shared by the tests of this file."""
    out = tmp_path_factory.mktemp("e2e")
    return e2e.main(["--quick", "--json", f"{out}/", "--plot", str(out / "e2e.png")]), out


@pytest.fixture
def report(run):
    return run[0]


def test_rows_are_the_floor_both_loras_and_every_registered_method(report):
    rows, left_out = set(report["results"]), set(report["params"]["left_out"])
    assert {"floor", "lora", "lora_p0", "peft_lora", "peft_lora_p0"} <= rows
    assert rows.isdisjoint(left_out)
    assert (rows | left_out) - {"floor", "lora_p0", "peft_lora", "peft_lora_p0"} == set(methods.names())
    assert left_out <= {"multitask", "trainable_tokens"}  # these need several tasks' data / new tokens


def test_e2e_bench_writes_the_documented_json(run):
    report, out = run
    (written,) = out.glob("e2e-cpu-*.json")
    assert json.loads(written.read_text()) == report
    assert (out / "e2e.png").stat().st_size > 0
    assert {"op", "device", "device_name", "dtype", "shape", "params", "torch", "triton", "results",
            "ratios"} <= set(report)
    assert (report["op"], report["device"], report["shape"]) == ("e2e", "cpu", {"batch": 4, "seq": 16, "layers": 1})
    assert report["params"]["threads"] == 1  # --quick; full runs take 2
    for name, result in report["results"].items():
        assert set(result) == IMPL_KEYS, name
        assert 0 < result["step_ms_q1"] <= result["fwd_bwd_ms"] <= result["step_ms_q3"], name
        assert result["peak_bytes"] is None and result["peak_rss_bytes"] is None, name  # CPU, --quick: no RSS runs
        assert report["ratios"].get(f"{name}/floor", 1.0) > 0, name


def test_gradients_are_those_of_the_trainable_parameters_only(report):
    results = report["results"]
    assert results["floor"]["trainable"] == 0 and results["floor"]["grad_bytes"] == 0
    assert results["floor"]["saved_bytes"] > 0  # the backward runs through every layer to the embeddings
    for name, result in results.items():
        assert result["grad_bytes"] == 4 * result["trainable"], name  # fp32 gradients of exactly those
    assert results["lora"]["trainable"] == results["peft_lora"]["trainable"]
    assert results["bitfit"]["grad_bytes"] < results["lora"]["grad_bytes"]  # biases and head, no weight matrix
    assert report["ratios"]["peft_lora/lora"] == results["peft_lora"]["fwd_bwd_ms"] / results["lora"]["fwd_bwd_ms"]
    assert isinstance(report["ratios"]["target_met:lora/floor"], bool)


def test_every_step_trains_its_parameters_and_computes_no_other_gradient():
    torch.set_num_threads(1)
    base, tokenizer, train = base_model(None, 1, torch.device("cpu"), torch.float32)
    setups, _ = build(base, tokenizer, train, seq=16, search_examples=32)
    data = batch(tokenizer, train, 4, 16, torch.device("cpu"))
    for name, setup in setups.items():
        setup.model.train()
        before = {key: p.detach().clone() for key, p in setup.trainable().items()}
        assert bool(before) == (name != "floor"), name
        loss = setup.model(**data).loss
        loss.backward()
        assert loss.requires_grad, name
        for key, p in setup.model.named_parameters():
            assert (p.grad is not None) == p.requires_grad, f"{name}: {key}"
        setup.optimizer.step()
        setup.optimizer.zero_grad(set_to_none=True)
        for key, p in setup.trainable().items():
            assert not torch.equal(p, before[key]), f"{name}: {key} did not change"
    bitfit = setups["bitfit"].trainable()
    assert all(key.endswith("bias") or "classifier" in key for key in bitfit)


def test_peak_rss_comes_from_a_process_that_trains_only_that_implementation():
    args = e2e.parse_args(["--quick"])
    big = [torch.ones(2**28, dtype=torch.uint8)]  # 256 MiB in this parent, which the children must not report
    bitfit, full = e2e.peak_rss_bytes("bitfit", args), e2e.peak_rss_bytes("full_finetuning", args)
    del big
    model_bytes = sum(p.nbytes for p in base_model(None, 1, torch.device("cpu"), torch.float32)[0].parameters())
    assert model_bytes < bitfit < 2**30
    # Full fine-tuning also holds a gradient and two AdamW moments of every weight.
    assert full - bitfit > 2 * model_bytes
