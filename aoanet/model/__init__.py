"""The AoANet model: ``build_model(vocab_size, **options)``."""

from aoanet.model.aoa import AoAModel, build_model
from aoanet.model.options import ModelOptions

__all__ = ["AoAModel", "ModelOptions", "build_model"]
