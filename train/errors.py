"""Command-line hygiene. The errors that mean 'the input is wrong', reported as one clear line rather than a traceback."""

from model.config import ConfigError
from train.compile_for import TopologyError
from train.data import DataError
from train.checkpoint import CheckpointError, NonFiniteError
from train.mesh import MeshError
from train.rewards import RewardError
from train.tokenizers import TokenizerError
from train.workdir import RunError

USER_ERRORS = (CheckpointError, ConfigError, DataError, MeshError, NonFiniteError, RewardError,
               RunError, TokenizerError, TopologyError)


# Library log lines that mislead here: TFDS calls every local corpus and generated task a "custom
# data configuration" (they are ours: that is how they are named), and warns that a dataset it is
# about to prepare has no dataset_info.json yet.
_MISLEADING = ('Using custom data configuration', 'Variant folder')



def quiet_libraries() -> None:
  """Keeps orbax's per-save INFO lines, TFDS's progress bars and its misleading warnings out of
  the output; our own lines (train.progress) say what is happening instead."""
  import tensorflow_datasets as tfds
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  logging.get_absl_logger().addFilter(
      lambda record: not str(record.msg).startswith(_MISLEADING))
  tfds.disable_progress_bar()
