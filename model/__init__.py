"""nexttoken's model: a decoder-only LM assembled from a block pattern.

Importing the package registers every mixer and feed-forward with `model.blocks`.
"""

from model import attention, ffn, mamba2, moe, ssm  # noqa: F401  (registers the layer kinds)
from model.config import ConfigError, ModelConfig
from model.counting import count_params, training_flops_per_token
from model.lm import LM

__all__ = ['LM', 'ModelConfig', 'ConfigError', 'count_params', 'training_flops_per_token']
