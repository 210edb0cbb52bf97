"""What every command line shares: a flags parser that reports an unknown `--config.x.y` key as
one clear line (config_flags raises a bare AttributeError), and running `main` with it so that
wrong input (train.errors.USER_ERRORS) ends as one 'error: ...' line and exit status 2."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import ml_collections
from absl import app, flags
from ml_collections import config_flags


def _unknown_config_key(argv: list[str]) -> str | None:
  """'--config.a.b: config.a has no key 'b'; its keys are [...]' for the first override whose
  path the --config file does not have, or None when every path exists."""
  path = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  if path is None:
    return None
  spec = importlib.util.spec_from_file_location('_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for arg in argv:
    if not arg.startswith('--config.'):
      continue
    dotted = arg.split('=', 1)[0][len('--config.'):]
    node, prefix = config, 'config'
    for part in dotted.split('.'):
      if not hasattr(node, 'keys') or part not in node:
        keys = sorted(node.keys()) if hasattr(node, 'keys') else []
        return f'--config.{dotted}: {prefix} has no key {part!r}; its keys are {keys}'
      node, prefix = node[part], f'{prefix}.{part}'
  return None


def define_run_config(argv: list[str]) -> None:
  """--config for a command that reads a trained run (evaluation, sampling): the run's own
  resolved config, DIR/config.json of the --workdir in `argv`, which `--config.x.y=...` can
  override (e.g. --config.train.eval_batch_size=128). Empty when there is no run there: the
  command then says so."""
  workdir = next((a.split('=', 1)[1] for a in argv if a.startswith('--workdir=')), None)
  if workdir is None and '--workdir' in argv[:-1]:
    workdir = argv[argv.index('--workdir') + 1]
  path = os.path.join(workdir or '', 'config.json')
  saved = {}
  if workdir and os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
  config_flags.DEFINE_config_dict('config', ml_collections.ConfigDict(saved),
                                  'The run\'s config (DIR/config.json); override its values with '
                                  '--config.x.y=...', lock_config=True)


def parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except SystemExit as e:  # absl exits with 1 after printing the help asked for
    if e.code == 1 and any(a in ('--help', '-h', '--helpshort', '--helpfull') for a in argv):
      sys.exit(0)
    raise
  except (AttributeError, KeyError, flags.Error) as e:
    try:
      message = _unknown_config_key(argv)
    except Exception:  # the config file itself is broken: absl's message is the best we have
      message = None
    print(f'error: {message or e}', file=sys.stderr)
    sys.exit(2)


CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'experiments',
                       'configs')


def with_default_config(argv: list[str], path: str) -> list[str]:
  """argv with --config=path when it has no --config, for commands with a natural default
  config. The default goes in as a flag, not as the flag's default: config_flags would apply a
  default's --config.* overrides as the flag is defined, outside `run`'s clear error for
  unknown keys."""
  if any(a == '--config' or a.startswith('--config=') for a in argv):
    return argv
  return [argv[0], f'--config={path}', *argv[1:]]


def require_config(config) -> None:
  """A command whose --config has no natural default names the configs to choose from."""
  if config is None:
    from model.config import ConfigError
    names = sorted(f for f in os.listdir(CONFIGS) if f.endswith('.py') and f != '__init__.py')
    raise ConfigError(f'--config is required: a config file, e.g. one of experiments/configs/ '
                      f'({", ".join(names)})')


def run(main, errors: tuple[type[Exception], ...] = ()) -> None:
  """app.run(main) with `parse_flags`; USER_ERRORS and `errors` from main are reported as one
  line, not a traceback, with exit status 2. A run stopped by a signal (train.preemption) says
  where it stopped, with 128 + the signal's number; Ctrl-C anywhere else, 130. Where libtpu is
  installed but no TPU attached, JAX starts on the CPU without trying TPU
  (`mesh.prepare_backend`, which also sets XLA's CPU flags)."""
  def main_reporting_user_errors(argv):
    # After flag parsing: --help need not import JAX.
    from train.errors import USER_ERRORS
    from train.mesh import prepare_backend
    from train.preemption import Interrupted
    if len(argv) > 1:
      print(f'error: unexpected arguments {argv[1:]}; every value is given as --flag=value',
            file=sys.stderr)
      sys.exit(2)
    prepare_backend()  # before main creates a JAX backend
    try:
      return main(argv)
    except (*USER_ERRORS, *errors) as e:
      print(f'error: {e}', file=sys.stderr)
      sys.exit(2)
    except Interrupted as e:
      print(e, file=sys.stderr)
      sys.exit(e.exit_code)
    except KeyboardInterrupt:
      print('interrupted', file=sys.stderr)
      sys.exit(130)

  app.run(main_reporting_user_errors, flags_parser=parse_flags)
