"""Models: built-in architectures, the factory that builds them from config, weights files."""

from fedrac.models.builtin import CNN, MLP, ViTTiny
from fedrac.models.errors import ModelConfigError
from fedrac.models.factory import MODELS, build_model, check_model, check_model_input
from fedrac.models.weights import file_digest, load_weights, read_weights

__all__ = ["CNN", "MLP", "MODELS", "ModelConfigError", "ViTTiny", "build_model", "check_model",
           "check_model_input", "file_digest", "load_weights", "read_weights"]
