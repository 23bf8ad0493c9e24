"""SparseDeltaLinear: wrapping without copies, forward and gradients against a float64 oracle and
sparse_delta_linear_ref (nn.Linear and GPT-2 Conv1D, fp32 and bf16), training with optimizers (fused ones too)
that change the weight only at the mask, bit-exact unmerge after training, merge / unmerge errors, bad input."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from fastpeft import SparseDeltaLinear
from fastpeft.ops.sparse_delta import sparse_delta_linear_ref
from numerics import assert_close_to_reference

BASES = {"linear": lambda: nn.Linear(24, 16), "conv1d": lambda: Conv1D(16, 24)}  # in 24, out 16 for both
OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2),
    "adamw-fused": lambda p: torch.optim.AdamW(p, lr=1e-2, fused=True),  # bumps no version counter
}


def base_layer(kind: str, dtype=torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layer = BASES[kind]()
    nn.init.normal_(layer.weight, std=0.2)
    nn.init.normal_(layer.bias, std=0.2)
    return layer.to(dtype)


def random_mask(numel: int, nnz: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(numel, generator=g)[:nnz].sort().values.to(torch.int32)


def random_values(nnz: int, seed: int = 1, scale: float = 0.5) -> torch.Tensor:
    return scale * torch.randn(nnz, generator=torch.Generator().manual_seed(seed))


def sparse_layer(kind="linear", dtype=torch.float32, nnz=40, seed=0, values=True) -> SparseDeltaLinear:
    base = base_layer(kind, dtype, seed)
    indices = random_mask(base.weight.numel(), nnz, seed)
    return SparseDeltaLinear(base, indices, random_values(nnz, seed + 1) if values else None)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bits, so -0.0 and 0.0 (and NaN payloads) count as different."""
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def oracle(x, w0, bias, values, indices, fan_in_fan_out, dy):
    """(out, dx, d values) in float64 from the unmerged weight."""
    x64 = x.double().requires_grad_()
    v64 = values.detach().double().requires_grad_()
    w = w0.double().flatten().index_add(0, indices.long(), v64).view(w0.shape)
    out = F.linear(x64, w.t() if fan_in_fan_out else w, bias.double())
    out.backward(dy.double())
    return out.detach(), x64.grad, v64.grad


def in_dtype(x, w0, bias, values, indices, fan_in_fan_out, dy):
    """The same in x's dtype as plain PyTorch would do it: a merged weight, then a dense dW gathered at the mask."""
    merged = w0.float().flatten().index_add(0, indices.long(), values.detach()).view(w0.shape).to(x.dtype)
    merged.requires_grad_()
    xg = x.detach().clone().requires_grad_()
    out = F.linear(xg, merged.t() if fan_in_fan_out else merged, bias)
    out.backward(dy)
    return out.detach(), xg.grad, merged.grad.flatten()[indices.long()]


# --- construction -------------------------------------------------------------------------------------------------
def test_wraps_without_copying_freezes_the_base_and_trains_only_values():
    base = base_layer("linear")
    w0 = base.weight.detach().clone()
    indices = random_mask(base.weight.numel(), 30)
    layer = SparseDeltaLinear(base, indices.long())
    assert layer.base_layer is base and not base.weight.requires_grad and not base.bias.requires_grad
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["values"]
    assert layer.indices.dtype == torch.int32 and torch.equal(layer.indices, indices)  # int32: it fits
    assert layer.values.dtype == torch.float32 and not layer.values.any()  # zeros by default
    assert torch.equal(bits(layer.base_values), bits(w0.flatten()[indices.long()]))
    assert layer.merged and torch.equal(base.weight, w0)  # built merged; a zero delta changes nothing
    assert (layer.nnz, layer.density) == (30, 30 / (24 * 16))
    assert all(f in repr(layer) for f in ("nnz=30", "density=0.07812", "merged=True", "in=24, out=16"))


@pytest.mark.parametrize("kind", BASES)
def test_built_merged_the_weight_holds_w0_plus_delta_at_the_mask_only(kind):
    base = base_layer(kind)
    w0 = base.weight.detach().clone()
    indices, values = random_mask(w0.numel(), 50), random_values(50)
    layer = SparseDeltaLinear(base, indices, values)
    expected = w0.flatten().index_add(0, indices.long(), values).view(w0.shape)
    assert torch.equal(base.weight, expected)
    torch.testing.assert_close(layer.delta_weight(), expected - w0)


# --- forward and gradients ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", BASES)
@pytest.mark.parametrize("merged", [True, False])
def test_forward_and_gradients_match_the_oracle(kind, dtype, merged):
    layer = sparse_layer(kind, dtype, nnz=60)
    if not merged:
        layer.unmerge()
    w0 = layer.base_layer.weight.detach().clone()
    w0.view(-1)[layer.indices.long()] = layer.base_values
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 24, generator=g).to(dtype).requires_grad_()
    dy = torch.randn(2, 5, 16, generator=g).to(dtype)
    out = layer(x)
    out.backward(dy)
    args = (x.detach(), w0, layer.base_layer.bias, layer.values, layer.indices, layer.fan_in_fan_out, dy)
    exact, torch_dtype = oracle(*args), in_dtype(*args)
    scale = oracle(x.detach().abs(), w0.abs(), layer.base_layer.bias.abs(), layer.values.abs(), layer.indices,
                   layer.fan_in_fan_out, dy.abs())
    for name, actual, i in (("out", out, 0), ("dx", x.grad, 1)):
        assert_close_to_reference(name, actual, exact[i], torch_dtype[i], dtype, scale[i])
    # the values' gradient is fp32 whatever the input dtype: the fp32 budget on top of PyTorch's in-dtype error
    assert_close_to_reference("d values", layer.values.grad, exact[2], torch_dtype[2].float(), torch.float32,
                              scale[2])


@pytest.mark.parametrize("kind", BASES)
def test_unmerged_layer_runs_the_reference_path(kind):
    layer = sparse_layer(kind)
    layer.unmerge()
    x = torch.randn(3, 24, generator=torch.Generator().manual_seed(0))
    base = layer.base_layer
    expected = sparse_delta_linear_ref(x, base.weight, base.bias, layer.values, layer.indices, layer.fan_in_fan_out)
    assert torch.equal(layer(x), expected)
    layer.merge()
    torch.testing.assert_close(layer(x), expected)


def test_conv1d_equals_the_conv1d_with_the_dense_delta_added():
    layer = sparse_layer("conv1d")
    layer.unmerge()
    plain = Conv1D(16, 24)
    with torch.no_grad():
        plain.weight.copy_(layer.base_layer.weight + layer.delta_weight())
        plain.bias.copy_(layer.base_layer.bias)
    x = torch.randn(2, 3, 24, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(layer(x), plain(x))


def test_two_forwards_before_one_backward():
    """Contrastive-style training: nothing is re-scattered between them, so the first graph stays valid."""
    layer = sparse_layer()
    x = torch.randn(4, 24, generator=torch.Generator().manual_seed(0))
    (layer(x).sum() + layer(x).sum()).backward()
    single = layer.values.grad.clone()
    layer.values.grad = None
    layer(x).sum().backward()
    torch.testing.assert_close(single, 2 * layer.values.grad)


def test_an_empty_mask_is_the_base_layer():
    base = base_layer("linear")
    layer = SparseDeltaLinear(base, torch.zeros(0, dtype=torch.int64))
    x = torch.randn(3, 24, requires_grad=True)
    torch.testing.assert_close(layer(x), base(x))
    layer(x).sum().backward()
    assert layer.values.grad.shape == (0,) and layer.density == 0


# --- training -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("kind", BASES)
def test_training_changes_the_weight_only_at_the_mask(kind, optimizer):
    layer = sparse_layer(kind, values=False)
    w0 = layer.base_layer.weight.detach().clone()
    outside = torch.ones(w0.numel(), dtype=torch.bool)
    outside[layer.indices.long()] = False
    opt = OPTIMIZERS[optimizer]([layer.values])
    g = torch.Generator().manual_seed(0)
    x, target = torch.randn(32, 24, generator=g), torch.randn(32, 16, generator=g)
    losses = []
    for _ in range(5):
        loss = F.mse_loss(layer(x), target)  # this forward first scatters the previous step's values
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    if optimizer != "sgd":  # optimizer state is O(nnz): AdamW's moments have the values' size
        assert opt.state[layer.values]["exp_avg"].shape == opt.state[layer.values]["exp_avg_sq"].shape == (layer.nnz,)
    layer(x)  # scatters the last step
    weight = layer.base_layer.weight
    assert torch.equal(weight.flatten()[outside], w0.flatten()[outside])
    assert torch.equal(weight.flatten()[layer.indices.long()], layer.base_values + layer.values.detach())
    assert layer.values.abs().min() > 0
    expected = sparse_delta_linear_ref(x, w0, layer.base_layer.bias, layer.values, layer.indices,
                                       layer.fan_in_fan_out)
    torch.testing.assert_close(layer(x), expected)


def test_in_place_updates_outside_an_optimizer_are_seen():
    layer = sparse_layer()
    x = torch.randn(3, 24)
    base = layer.base_layer
    with torch.no_grad():
        layer.values.mul_(-2)
    w0 = base.weight.detach().clone()
    w0.view(-1)[layer.indices.long()] = layer.base_values
    torch.testing.assert_close(layer(x), sparse_delta_linear_ref(x, w0, base.bias, layer.values, layer.indices))
    layer.load_state_dict({**layer.state_dict(), "values": torch.zeros(layer.nnz)})
    torch.testing.assert_close(layer(x), F.linear(x, w0, base.bias))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unmerge_after_training_is_bit_exact(dtype):
    layer = sparse_layer("linear", dtype, values=False)
    with torch.no_grad():  # a signed zero at the mask: base + 0.0 would round it to +0.0
        layer.unmerge()
        layer.base_layer.weight.view(-1)[layer.indices[0]] = -0.0
    original = layer.base_layer.weight.detach().clone()
    layer = SparseDeltaLinear(layer.base_layer, layer.indices)
    opt = torch.optim.AdamW([layer.values], lr=0.05)
    x = torch.randn(16, 24).to(dtype)
    for _ in range(3):
        layer(x).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
        layer(x)
        assert not torch.equal(layer.base_layer.weight, original)
        layer.unmerge()
        assert torch.equal(bits(layer.base_layer.weight), bits(original))
        layer.merge()


def test_merge_and_unmerge_errors():
    layer = sparse_layer()
    with pytest.raises(ValueError, match="already merged; unmerge\\(\\) first"):
        layer.merge()
    layer.unmerge()
    with pytest.raises(ValueError, match="not merged"):
        layer.unmerge()


# --- bad input ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("indices, values, error, message", [
    (torch.tensor([1.0, 2.0]), None, TypeError, "indices must be int32 or int64, got torch.float32"),
    (torch.tensor([[1, 2]]), None, ValueError, "indices must be 1-D"),
    (torch.tensor([3, 1]), None, ValueError, "strictly increasing"),
    (torch.tensor([1, 1]), None, ValueError, "strictly increasing"),
    (torch.tensor([0, 384]), None, ValueError, r"must lie in \[0, 384\)"),
    (torch.tensor([-1, 3]), None, ValueError, r"must lie in \[0, 384\)"),
    ([1, 2], None, TypeError, "indices must be a torch.Tensor"),
    (torch.tensor([1, 2]), torch.zeros(3), ValueError, r"values must have shape \(2,\)"),
    (torch.tensor([1, 2]), torch.zeros(2, dtype=torch.int32), TypeError, "values must be float32"),
])
def test_bad_indices_and_values_are_named(indices, values, error, message):
    base = base_layer("linear")
    w0 = base.weight.detach().clone()
    with pytest.raises(error, match=message):
        SparseDeltaLinear(base, indices, values)
    assert torch.equal(base.weight, w0) and base.weight.requires_grad  # untouched


def test_non_linear_base_is_rejected():
    with pytest.raises(TypeError, match="nn.Linear or transformers' Conv1D, got Conv2d"):
        SparseDeltaLinear(nn.Conv2d(3, 3, 1), torch.tensor([0]))
