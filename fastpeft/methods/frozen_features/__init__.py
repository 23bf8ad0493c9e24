"""Frozen features: the model frozen (eval mode, no_grad, an optional feature cache), only its heads train."""
from fastpeft.methods.frozen_features.config import FrozenFeaturesConfig
from fastpeft.methods.frozen_features.method import FrozenFeaturesMethod

__all__ = ["FrozenFeaturesConfig", "FrozenFeaturesMethod"]
