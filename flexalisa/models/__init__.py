"""Model shapes, weights as per-layer tensor dicts, layer functions, loaders and tokenizers."""

from cost_model.spec import ModelSpec
from flexalisa.models.family import family_of
from flexalisa.models.loader import default_model_path, load_model
from flexalisa.models.tokenizer import Tokenizer
from flexalisa.models.weights import LayerWeights, ModelWeights

__all__ = ["LayerWeights", "ModelSpec", "ModelWeights", "Tokenizer", "default_model_path",
           "family_of", "load_model"]
