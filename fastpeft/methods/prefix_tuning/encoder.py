"""The learned prefixes. `PrefixEncoder` holds one adapter's, as PEFT's PrefixEncoder: plain ([num_virtual_tokens,
num_layers * 2 * token_dim], laid out per layer as key then value, each heads x head size), or reparameterised through
an MLP while training. `PrefixEncoders` holds every adapter's under its name and says which one runs; it is a submodule
of the model (attribute ATTRIBUTE), so that the prefixes follow state_dict, .to() and train / eval."""
import torch
from torch import nn

ATTRIBUTE = "prefix_tuning"


class PrefixEncoder(nn.Module):
    """`embedding.weight` is the plain prefixes; with `projection`, `embedding` [n, token_dim] and `transform` (Linear
    -> Tanh -> Linear) compute them (PEFT's parameter names, so a state dict reads the same)."""

    def __init__(self, num_virtual_tokens: int, num_layers: int, heads: int, token_dim: int,
                 projection: int | None = None, zero: bool = False, device=None, dtype=None):
        super().__init__()
        self.num_layers, self.heads = num_layers, heads
        width = num_layers * 2 * token_dim
        like = dict(device=device, dtype=dtype)
        if projection is None:
            self.embedding = nn.Embedding(num_virtual_tokens, width, **like)
            self.transform = None
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, token_dim, **like)
            self.transform = nn.Sequential(nn.Linear(token_dim, projection, **like), nn.Tanh(),
                                           nn.Linear(projection, width, **like))
        if zero:  # PEFT's init_weights="zero": zero prefixes
            nn.init.zeros_((self.transform[-1] if self.transform is not None else self.embedding).weight)
            if self.transform is not None:
                nn.init.zeros_(self.transform[-1].bias)

    def forward(self) -> torch.Tensor:
        """[num_virtual_tokens, num_layers * 2 * token_dim]: the prefixes of every layer."""
        if self.transform is None:
            return self.embedding.weight
        return self.transform(self.embedding.weight)

    def layer(self, prefixes: torch.Tensor, index: int, batch: int, dtype: torch.dtype):
        """(key, value) of layer `index`, each [batch, heads, num_virtual_tokens, head size], from `prefixes` (this
        encoder's output; PEFT's layout: per layer, key then value, each heads x head size)."""
        per_slot = prefixes.view(prefixes.shape[0], 2 * self.num_layers, self.heads, -1)
        return tuple(per_slot[:, 2 * index + i].transpose(0, 1).unsqueeze(0).expand(batch, -1, -1, -1).to(dtype)
                     for i in (0, 1))


class PrefixEncoders(nn.Module):
    """`encoders`: adapter name -> PrefixEncoder; `active()` is the one whose prefixes go into the attention (None:
    none runs)."""

    def __init__(self):
        super().__init__()
        self.encoders = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False

    def active(self) -> PrefixEncoder | None:
        if self.disabled or self.active_adapter not in self.encoders:
            return None
        return self.encoders[self.active_adapter]
