"""The GPT decoder (math only); parallel layers and kernels are injected."""
from .gpt import GPT, LayerFactory

__all__ = ["GPT", "LayerFactory"]
