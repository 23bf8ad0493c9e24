"""DiffSearchLinear: wrapping without copies, the base output bit for bit when the diff is off, the merged weight when
every gate is open, forward and gradients against float64 with the same sampled gates, the structured penalty,
gated_diff, errors. nn.Linear and GPT-2 Conv1D (weight stored [in, out]), fp32 and bf16."""
import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

from fastpeft.modules.diff_search import DiffSearchLinear
from tests.budget import examples
from tests.model_cases import one_thread  # noqa: F401  (autouse fixture)
from tests.numerics import assert_close_to_reference

DTYPES = [torch.float32, torch.bfloat16]


def make_base(kind: str, in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> nn.Module:
    """A random nn.Linear or Conv1D (whose bias is always there) in `dtype`."""
    layer = nn.Linear(in_features, out_features, bias=bias) if kind == "linear" else Conv1D(out_features, in_features)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    return layer.to(dtype)


def flip(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """Stored <-> [out, in] orientation: a transpose for Conv1D (its own inverse), nothing for nn.Linear."""
    return weight.t() if kind == "conv1d" else weight


cases = st.fixed_dictionaries(dict(
    kind=st.sampled_from(["linear", "conv1d"]), in_features=st.integers(1, 9), out_features=st.integers(1, 9),
    bias=st.booleans(), dtype=st.sampled_from(DTYPES), lead=st.lists(st.integers(1, 3), max_size=2),
    strided=st.booleans(), structured=st.booleans()))


def make_case(case: dict, seed: int = 0):
    """(base layer, DiffSearchLinear over it, input x): x non-contiguous when `strided`."""
    torch.manual_seed(seed)
    base = make_base(case["kind"], case["in_features"], case["out_features"], case["bias"], case["dtype"])
    layer = DiffSearchLinear(base, structured=case["structured"])
    width = case["in_features"] * (2 if case["strided"] else 1)
    x = torch.randn(*case["lead"], width).to(case["dtype"])
    return base, layer, x[..., ::2] if case["strided"] else x


def fill(layer: DiffSearchLinear, log_alpha: float | None = None) -> None:
    """Random diff; every log_alpha set to `log_alpha`, or drawn from [-1, 3] when None (gates of every kind)."""
    with torch.no_grad():
        layer.diff.normal_(0, 0.5)
        for gate in filter(None, (layer.gate, layer.group_gate)):
            if log_alpha is None:
                gate.log_alpha.uniform_(-1, 3)
            else:
                gate.log_alpha.fill_(log_alpha)


def test_wraps_without_copying_and_freezes_the_base():
    for base, stored in ((nn.Linear(12, 7), (7, 12)), (Conv1D(7, 12), (12, 7))):
        layer = DiffSearchLinear(base)
        assert layer.base_layer is base and layer.base_layer.weight.data_ptr() == base.weight.data_ptr()
        assert not any(p.requires_grad for p in base.parameters())
        assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["diff", "gate.log_alpha"]
        assert (layer.in_features, layer.out_features, layer.fan_in_fan_out) == (12, 7, isinstance(base, Conv1D))
        assert layer.diff.shape == stored and layer.diff.dtype == torch.float32 and not layer.diff.any()
        assert layer.gate.log_alpha.shape == stored and layer.group_gate is None and not layer.structured
    structured = DiffSearchLinear(nn.Linear(3, 2).to(torch.bfloat16), structured=True)
    assert structured.group_gate.log_alpha.shape == () and structured.structured
    assert structured.diff.dtype == torch.float32 and structured.gate.log_alpha.dtype == torch.float32
    assert [n for n, p in structured.named_parameters() if p.requires_grad] == [
        "diff", "gate.log_alpha", "group_gate.log_alpha"]


@examples(15)
@given(case=cases, train=st.booleans(), closed=st.booleans())
def test_diff_off_gives_the_base_output_bit_for_bit(case, train, closed):
    """A zero diff, or a random diff behind closed gates (z == 0 exactly, sampled or not): the base layer's bits."""
    base, layer, x = make_case(case)
    if closed:
        fill(layer, log_alpha=-100.0)
    layer.train(train)
    out = layer(x)
    assert out.dtype == case["dtype"] and out.shape == (*case["lead"], case["out_features"])
    assert torch.equal(out, base(x))


@examples(15)
@given(case=cases, train=st.booleans())
def test_open_gates_give_the_merged_weight(case, train):
    """Gates that are all 1 (sampled or not): the base layer with W0 + diff (summed in fp32, rounded once), bit for
    bit, and close to the float64 product."""
    base, layer, x = make_case(case)
    fill(layer, log_alpha=100.0)
    layer.train(train)
    merged = copy.deepcopy(base)
    with torch.no_grad():
        merged.weight.copy_(base.weight.float() + layer.diff)
    out = layer(x)
    assert torch.equal(out, merged(x))
    kind = case["kind"]
    w = flip(base.weight.double() + layer.diff.double(), kind)
    bias = None if base.bias is None else base.bias.double()
    exact = nn.functional.linear(x.double(), w, bias)
    scale = nn.functional.linear(x.double().abs(), w.abs(), None if bias is None else bias.abs())
    in_dtype = (nn.functional.linear(x, flip(base.weight, kind), base.bias) +  # plain PyTorch: the diff on its own
                nn.functional.linear(x, flip(layer.diff, kind).to(x.dtype)))
    assert_close_to_reference("output", out, exact, in_dtype, case["dtype"], scale)


def test_default_init_in_eval_is_the_merged_weight():
    """log_alpha = 5: the eval gate is exactly 1, so a trained diff applies in full."""
    torch.manual_seed(0)
    base = nn.Linear(6, 4)
    layer = DiffSearchLinear(base).eval()
    fill(layer, log_alpha=5.0)
    x = torch.randn(3, 6)
    expected = nn.functional.linear(x, base.weight + layer.diff, base.bias)
    assert torch.equal(layer(x), expected)


def captured_gates(layer: DiffSearchLinear) -> dict:
    """Filled by the next forward pass: gate module -> the z it returned (float64)."""
    seen = {}
    for gate in filter(None, (layer.gate, layer.group_gate)):
        gate.register_forward_hook(lambda module, args, z: seen.__setitem__(module, z.detach().double()))
    return seen


def gate_derivative(z: torch.Tensor, gate) -> torch.Tensor:
    """dz / d log_alpha of a training sample, from the sample itself: (r - l) s (1 - s) / T inside (0, 1), else 0."""
    s = (z - gate.low) / (gate.high - gate.low)
    inside = (z > 0) & (z < 1)
    return torch.where(inside, (gate.high - gate.low) * s * (1 - s) / gate.temperature, torch.zeros_like(z))


@examples(20)
@given(case=cases, seed=st.integers(0, 2**16))
def test_forward_and_gradients_match_float64_with_the_same_gates(case, seed):
    base, layer, x = make_case(case, seed)
    fill(layer)  # log_alpha in [-1, 3]: gates at 0, at 1 and in between
    z = captured_gates(layer)
    dy = torch.randn(*case["lead"], case["out_features"]).to(case["dtype"]).float()  # exact in the dtype
    out = layer(x)
    (out.float() * dy).sum().backward()
    assert base.weight.grad is None and (base.bias is None or base.bias.grad is None)

    z_element = z[layer.gate]
    z_group = z[layer.group_gate] if layer.structured else torch.tensor(1.0, dtype=torch.float64)
    kind = case["kind"]
    x2d, dy2d = x.double().reshape(-1, case["in_features"]), dy.double().reshape(-1, case["out_features"])
    w0, diff = base.weight.double(), layer.diff.detach().double()
    bias = None if base.bias is None else base.bias.double()

    # Forward: x (W0 + z diff)^T + b.
    w = w0 + z_element * z_group * diff
    exact = nn.functional.linear(x2d, flip(w, kind), bias)
    scale = nn.functional.linear(x2d.abs(), flip(w.abs(), kind), None if bias is None else bias.abs())
    gated = (z_element * z_group * diff).to(case["dtype"])  # plain PyTorch in the dtype: delta rounded on its own
    in_dtype = nn.functional.linear(x.reshape(-1, case["in_features"]), flip(base.weight + gated, kind), base.bias)
    assert_close_to_reference("output", out.reshape(-1, case["out_features"]), exact, in_dtype, case["dtype"], scale)

    # Gradients: dW = dy^T x (stored orientation); d diff = z dW; d log_alpha = dW diff z_group dz/d log_alpha.
    d_weight, d_weight_scale = flip(dy2d.t() @ x2d, kind), flip(dy2d.abs().t() @ x2d.abs(), kind)
    d_weight_in_dtype = flip(dy2d.t().to(case["dtype"]) @ x.reshape(-1, case["in_features"]), kind).double()
    dz_element = gate_derivative(z_element, layer.gate)
    expected = {
        "diff": (z_element * z_group * d_weight, z_element * z_group * d_weight_scale,
                 z_element * z_group * d_weight_in_dtype),
        "log_alpha": (d_weight * diff * z_group * dz_element, d_weight_scale * diff.abs() * z_group * dz_element,
                      d_weight_in_dtype * diff * z_group * dz_element),
    }
    actual = {"diff": layer.diff.grad, "log_alpha": layer.gate.log_alpha.grad}
    if layer.structured:
        dz_group = gate_derivative(z_group, layer.group_gate)
        expected["group log_alpha"] = tuple((d * diff_abs * z_element).sum() * dz_group for d, diff_abs in (
            (d_weight, diff), (d_weight_scale, diff.abs()), (d_weight_in_dtype, diff)))
        actual["group log_alpha"] = layer.group_gate.log_alpha.grad
    for name, (exact, scale, in_dtype) in expected.items():
        assert_close_to_reference(name, actual[name], exact, in_dtype.float(), torch.float32, scale)


def test_training_changes_only_the_diff_and_gates():
    torch.manual_seed(0)
    for base in (nn.Linear(8, 5), Conv1D(5, 8)):
        original = {n: p.clone() for n, p in base.named_parameters()}
        layer = DiffSearchLinear(base, structured=True)
        optimizer = torch.optim.Adam([p for p in layer.parameters() if p.requires_grad], lr=0.1)
        for _ in range(3):
            loss = layer(torch.randn(4, 8)).square().mean() + 1e-3 * layer.expected_l0()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        assert all(torch.equal(p, original[n]) and p.grad is None for n, p in base.named_parameters())
        assert layer.diff.abs().sum() > 0 and (layer.gate.log_alpha != 5.0).any()


def test_expected_l0_elementwise_and_structured():
    torch.manual_seed(0)
    plain, structured = DiffSearchLinear(nn.Linear(5, 3)), DiffSearchLinear(nn.Linear(5, 3), structured=True)
    for layer in (plain, structured):
        fill(layer, log_alpha=None)
    p = plain.gate.probability_nonzero().detach().double()
    assert plain.expected_l0().shape == () and plain.expected_l0().item() == pytest.approx(p.sum().item(), rel=1e-6)

    # Structured (Guo et al. 2021): sum_i P(z_i != 0) P(z_group != 0), and the gradient reaches both gates.
    p_i = structured.gate.probability_nonzero().detach().double()
    p_g = structured.group_gate.probability_nonzero().detach().double()
    l0 = structured.expected_l0()
    assert l0.shape == () and l0.item() == pytest.approx((p_i * p_g).sum().item(), rel=1e-6)
    l0.backward()
    torch.testing.assert_close(structured.gate.log_alpha.grad.double(), p_i * (1 - p_i) * p_g)
    assert structured.group_gate.log_alpha.grad.item() == pytest.approx(
        (p_i.sum() * p_g * (1 - p_g)).item(), rel=1e-5)


def test_the_penalty_alone_closes_gates():
    torch.manual_seed(0)
    layer = DiffSearchLinear(nn.Linear(16, 16), structured=True)
    optimizer = torch.optim.Adam([p for p in layer.parameters() if p.requires_grad], lr=0.5)
    start = layer.expected_l0().item()
    for _ in range(30):
        optimizer.zero_grad()
        layer.expected_l0().backward()
        optimizer.step()
    assert layer.expected_l0().item() < 0.01 * start
    assert not layer.gate.deterministic().any() and layer.group_gate.deterministic() == 0


@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_gated_diff_is_the_eval_gate_times_diff(kind, structured):
    torch.manual_seed(0)
    layer = DiffSearchLinear(make_base(kind, 6, 4, True, torch.bfloat16), structured=structured)
    fill(layer, log_alpha=None)
    with torch.no_grad():
        layer.gate.log_alpha[0].fill_(-3.0)  # sigmoid(-3) * 3 - 1.5 < 0: a closed row
        if structured:
            layer.group_gate.log_alpha.fill_(0.2)  # a group gate strictly between 0 and 1
    state = torch.get_rng_state()
    gated = layer.train().gated_diff()
    assert torch.equal(torch.get_rng_state(), state)  # deterministic whatever the mode
    assert gated.dtype == torch.float32 and gated.shape == layer.diff.shape and not gated.requires_grad
    low, high = -1.5, 1.5
    z = (torch.sigmoid(layer.gate.log_alpha.detach().double()) * (high - low) + low).clamp(0, 1)
    if structured:
        z = z * (torch.sigmoid(torch.tensor(0.2, dtype=torch.float64)) * (high - low) + low).clamp(0, 1)
        assert 0 < z.max() < 1
    torch.testing.assert_close(gated.double(), z * layer.diff.detach().double(), rtol=1e-6, atol=1e-7)
    assert not gated[0].any() and gated.abs().sum() > 0
    # It is what the layer applies in eval mode.
    layer.eval()
    merged = copy.deepcopy(layer.base_layer)
    with torch.no_grad():
        merged.weight.copy_(layer.base_layer.weight.float() + gated)
    x = torch.randn(3, 6).to(torch.bfloat16)
    assert torch.equal(layer(x), merged(x))


def transposed_weight(linear: nn.Linear) -> nn.Linear:
    linear.weight = nn.Parameter(linear.weight.detach().t().contiguous().t())
    return linear


@pytest.mark.parametrize("base, error, message", [
    (nn.Conv2d(2, 3, 1), TypeError, r"DiffSearchLinear wraps nn.Linear or transformers' Conv1D, got Conv2d"),
    (nn.Embedding(4, 3), TypeError, r"DiffSearchLinear wraps nn.Linear or transformers' Conv1D, got Embedding"),
    (torch.randn(3, 4), TypeError, r"DiffSearchLinear wraps nn.Linear or transformers' Conv1D, got Tensor"),
    (transposed_weight(nn.Linear(4, 3)), ValueError, r"base_layer.weight must be contiguous"),
    (nn.Linear(4, 3).to(torch.float8_e4m3fn), TypeError,
     r"base_layer.weight must be float32, bfloat16, float16 or float64, got torch.float8_e4m3fn"),
])
def test_not_a_linear_layer(base, error, message):
    with pytest.raises(error, match=message):
        DiffSearchLinear(base)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(temperature=0.0), ValueError, r"temperature must be a finite number > 0, got 0.0"),
    (dict(temperature=-2), ValueError, r"temperature must be a finite number > 0, got -2"),
    (dict(stretch=(0.1, 1.5)), ValueError, r"stretch must be a pair \(l, r\) with l < 0 and r > 1, got \(0.1, 1.5\)"),
    (dict(stretch=(-1.5, 0.9)), ValueError, r"stretch must be a pair \(l, r\) with l < 0 and r > 1, got \(-1.5, 0.9\)"),
    (dict(stretch=(-1.5,)), ValueError, r"stretch must be a pair \(l, r\)"),
    (dict(log_alpha_init=float("nan")), ValueError, r"log_alpha_init must be a finite number, got nan"),
    (dict(structured="yes"), TypeError, r"structured must be a bool, got 'yes'"),
])
def test_bad_options_leave_the_base_untouched(kwargs, error, message):
    base = nn.Linear(4, 3)
    with pytest.raises(error, match=message):
        DiffSearchLinear(base, **kwargs)
    assert all(p.requires_grad for p in base.parameters())


@pytest.mark.parametrize("x, error, message", [
    (torch.randn(2, 5), ValueError, r"x's last dimension must equal in_features 4, got x of shape \(2, 5\)"),
    (torch.tensor(1.0), ValueError, r"x's last dimension must equal in_features 4, got x of shape \(\)"),
    (torch.randn(2, 4, dtype=torch.bfloat16), TypeError, r"weight has dtype torch.float32 but x has torch.bfloat16"),
    (torch.ones(2, 4, dtype=torch.int64), TypeError, r"x must be float32, bfloat16, float16 or float64, got torch.int64"),
    ([[1.0] * 4], TypeError, r"x must be a torch.Tensor, got list"),
])
def test_bad_input(x, error, message):
    with pytest.raises(error, match=message):
        DiffSearchLinear(nn.Linear(4, 3))(x)


def test_extra_repr():
    text = repr(DiffSearchLinear(Conv1D(3, 5), temperature=0.5, stretch=(-0.1, 1.1), structured=True))
    assert "in=5, out=3, shape=(5, 3), temperature=0.5, stretch=(-0.1, 1.1), structured=True" in text
