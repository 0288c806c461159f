"""The AoANet model: ``build_model(vocab_size, **options)``."""

from aoanet.model.aoa import AoAModel, FoldedStep, build_model
from aoanet.model.options import ModelOptions

__all__ = ["AoAModel", "FoldedStep", "ModelOptions", "build_model"]
