"""`PromptEmbedding`: the model's word embeddings, unchanged, with the learned prompt tokens of each adapter beside
them. It stands in the embeddings' place so that the prompts are inside the model (state_dict, .to(), train / eval
follow it) and the embeddings are marked as this method's (two methods cannot adapt one module); the forward
pre-hook of fastpeft.methods.prompt_tuning.hook puts the active prompt in front of the input."""
import torch
from torch import nn


class PromptEmbedding(nn.Module):
    """`prompts[name]`: adapter `name`'s [num_virtual_tokens, token_dim] embeddings (PEFT's `prompt_embeddings`)."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.prompts = nn.ParameterDict()
        self.active_adapter: str | None = None
        self.disabled = False

    def forward(self, *args, **kwargs):
        """The word embeddings alone: the model's own uses of them (and a tied output head) see no change."""
        return self.base_layer(*args, **kwargs)

    @property
    def weight(self) -> nn.Parameter:
        """The word embeddings' weight, for code that reads `model.get_input_embeddings().weight`."""
        return self.base_layer.weight

    def add_adapter(self, name: str, values: torch.Tensor) -> None:
        self.prompts[name] = nn.Parameter(values)

    def delete_adapter(self, name: str) -> None:
        del self.prompts[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def active_prompt(self) -> torch.Tensor | None:
        """The prompt that goes in front of the input (None when disabled or no adapter is active)."""
        if self.disabled or self.active_adapter not in self.prompts:
            return None
        return self.prompts[self.active_adapter]
