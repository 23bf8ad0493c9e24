"""`TrainableTokensLayer`: an embedding (or the output layer tied to it) whose rows `token_indices` are replaced by
trainable ones; the base weight stays frozen and bit-identical, and the gradient and optimizer state are O(rows).

Names as PEFT's TrainableTokensLayer, so state-dict paths and file keys match: `trainable_tokens_delta[name]` holds
the rows' *values* (PEFT's name; values, not differences, so that a file stays right whatever random rows a resized
embedding got), `trainable_tokens_original[name]` the replaced base rows (for a bit-exact unmerge). Unlike PEFT,
which index_copies the rows into a full copy of the weight at every forward (O(vocab x dim)), the forward looks up
the frozen weight and swaps in only the positions that hold a chosen token."""
import torch
import torch.nn.functional as F
from torch import nn


class TrainableTokensLayer(nn.Module):
    """Wraps an nn.Embedding, or (`tied_to` an embedding's layer) an nn.Linear output layer sharing its weight, whose
    rows then come from that layer: one set of trainable rows for both, as in PEFT."""

    def __init__(self, base_layer: nn.Module, tied_to: "TrainableTokensLayer | None" = None):
        super().__init__()
        if not isinstance(base_layer, nn.Embedding if tied_to is None else nn.Linear):
            raise TypeError(f"trainable tokens wrap an nn.Embedding (or an nn.Linear tied to one), got "
                            f"{type(base_layer).__name__}")
        self.base_layer = base_layer
        self._tied = [tied_to] if tied_to is not None else []  # a list: not a submodule, not in the state_dict twice
        if tied_to is None:
            self.trainable_tokens_delta = nn.ParameterDict()
            self.trainable_tokens_original = nn.ParameterDict()  # frozen; a ParameterDict so .to() and dtype follow
            self.token_indices: dict[str, list[int]] = {}
        self.active_adapter: str | None = None
        self.disabled = False
        self.merged_adapter: str | None = None

    @property
    def owner(self) -> "TrainableTokensLayer":
        """The layer holding the rows: this one, or the embedding's layer it is tied to."""
        return self._tied[0] if self._tied else self

    @property
    def weight(self) -> nn.Parameter:
        """The frozen base weight, for code that reads `get_input_embeddings().weight`."""
        return self.base_layer.weight

    def add_adapter(self, name: str, indices: list[int], values: torch.Tensor) -> None:
        weight = self.base_layer.weight
        self.token_indices[name] = list(indices)
        self.trainable_tokens_delta[name] = nn.Parameter(values.to(weight.device))
        rows = weight.detach()[torch.tensor(indices, device=weight.device)].clone()
        self.trainable_tokens_original[name] = nn.Parameter(rows, requires_grad=False)

    def delete_adapter(self, name: str) -> None:
        for store in (self.trainable_tokens_delta, self.trainable_tokens_original, self.token_indices):
            del store[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def _running(self) -> str | None:
        owner = self.owner
        if self.disabled or owner.merged_adapter is not None or self.active_adapter not in owner.token_indices:
            return None
        return self.active_adapter

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        name = self._running()
        if name is None:
            return out
        owner = self.owner
        rows = owner.trainable_tokens_delta[name].to(self.base_layer.weight.dtype)
        index = torch.tensor(owner.token_indices[name], device=x.device)
        if isinstance(self.base_layer, nn.Embedding):
            return _swap_rows(self.base_layer, out, x, index, rows)
        bias = self.base_layer.bias  # the tied output layer: the logits of the chosen tokens come from the rows
        new = F.linear(x, rows, None if bias is None else bias[index])
        return out.index_copy(-1, index, new.to(out.dtype))

    # --- merge: the rows written into the base weight (the tied output layer sees them too) --------------------------
    @torch.no_grad()
    def merge(self, name: str) -> None:
        index = torch.tensor(self.token_indices[name], device=self.base_layer.weight.device)
        self.base_layer.weight.index_copy_(0, index, self.trainable_tokens_delta[name].to(self.base_layer.weight))
        self.merged_adapter = name

    @torch.no_grad()
    def unmerge(self) -> None:
        """The replaced rows back, bit for bit."""
        name, self.merged_adapter = self.merged_adapter, None
        index = torch.tensor(self.token_indices[name], device=self.base_layer.weight.device)
        self.base_layer.weight.index_copy_(0, index, self.trainable_tokens_original[name])


def _swap_rows(embedding: nn.Embedding, out: torch.Tensor, x: torch.Tensor, index: torch.Tensor,
               rows: torch.Tensor) -> torch.Tensor:
    """`out` with the positions of `x` that hold a chosen token taken from `rows` (their gradient reaches only the
    rows used); scaled like the base output where the embedding scales it (e.g. Gemma's embed_scale)."""
    hits = x.unsqueeze(-1) == index  # [..., n]: O(tokens x rows), no copy of the vocabulary-sized weight
    chosen = F.embedding(hits.int().argmax(-1), rows)
    scale = getattr(embedding, "embed_scale", None)
    if scale is not None:
        chosen = chosen * scale.to(chosen.dtype)
    return torch.where(hits.any(-1, keepdim=True), chosen.to(out.dtype), out)
