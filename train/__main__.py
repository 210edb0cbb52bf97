"""python -m train --config=experiments/configs/shakespeare_char.py --workdir=DIR [--config.k=v]

Trains the configured model in DIR, resuming from its latest checkpoint when there is one.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from train import cli

config_flags.DEFINE_config_file('config', None, 'Experiment config file (experiments/configs/*.py).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Work directory: config, tokenizer, checkpoints, metrics.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from train import loop  # after flag parsing: importing jax is slow, --help should not wait
  from train.errors import USER_ERRORS, quiet_libraries
  quiet_libraries()
  try:
    loop.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
  except USER_ERRORS as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  cli.run(main)
