"""Trainable tokens (PEFT's TRAINABLE_TOKENS): chosen rows of the word embeddings train, the rest stays frozen."""
from fastpeft.methods.trainable_tokens.config import TrainableTokensConfig
from fastpeft.methods.trainable_tokens.method import TrainableTokensMethod

__all__ = ["TrainableTokensConfig", "TrainableTokensMethod"]
