"""Command-line hygiene. The errors that mean 'the input is wrong', reported as one clear line rather than a traceback."""

from model.config import ConfigError
from train.data import DataError
from train.checkpoint import CheckpointError, NonFiniteError
from train.mesh import MeshError
from train.tokenizers import TokenizerError
from train.workdir import RunError

USER_ERRORS = (CheckpointError, ConfigError, DataError, MeshError, NonFiniteError, RunError,
               TokenizerError)


def quiet_libraries() -> None:
  """Keeps orbax's per-save INFO lines and TFDS's progress bars out of the run's output."""
  import tensorflow_datasets as tfds
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  tfds.disable_progress_bar()
