"""What every command line shares: a flags parser that reports an unknown `--config.x.y` key as
one clear line (config_flags raises a bare AttributeError), and running `main` with it so that
wrong input (train.errors.USER_ERRORS) ends as one 'error: ...' line and exit status 2."""

from __future__ import annotations

import importlib.util
import sys

from absl import app, flags


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


def parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError, flags.Error) as e:
    try:
      message = _unknown_config_key(argv)
    except Exception:  # the config file itself is broken: absl's message is the best we have
      message = None
    print(f'error: {message or e}', file=sys.stderr)
    sys.exit(2)


def run(main, errors: tuple[type[Exception], ...] = ()) -> None:
  """app.run(main) with `parse_flags`; USER_ERRORS and `errors` from main are reported as one
  line, not a traceback, with exit status 2. A run stopped by a signal (train.preemption) says
  where it stopped, with 128 + the signal's number; Ctrl-C anywhere else, 130."""
  def main_reporting_user_errors(argv):
    # After flag parsing: --help need not import JAX.
    from train.errors import USER_ERRORS
    from train.preemption import Interrupted
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
