"""What every command line shares: its --workdir and --config flags (`command`, one call from
each command's `if __name__ == '__main__':` block), a flags parser that reports an unknown
`--config.x.y` key, an unknown preset (`--config=FILE:quick`) or a missing config file as one
clear line (config_flags raises a bare AttributeError, OSError or a traceback's text), a check
of the --workdir against the command that made it (train.workdir.check_command), and running
`main` so that wrong input (train.errors.USER_ERRORS) ends as one 'error: ...' line and exit
status 2. Nothing here imports JAX before the flags are parsed: `--help` answers at once."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import ml_collections
from absl import app, flags
from ml_collections import config_flags

# The flags `command` defines belong to the command that calls it: --help lists them.
flags.disclaim_key_flags()


def _config_problem(argv: list[str]) -> str | None:
  """What is wrong with the --config in `argv`, as one line: its preset's error (a ConfigError of
  `get_config(preset)`, e.g. an unknown preset), or '--config.a.b: config.a has no key 'b'; its
  keys are [...]' for the first override whose path the config does not have; None when neither."""
  value = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  if value is None:
    return None
  path, *preset = value.split(':', 1)  # config_flags passes the text after ':' to get_config
  spec = importlib.util.spec_from_file_location('_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  from model.errors import ConfigError  # the config file has imported JAX already
  try:
    config = module.get_config(*preset)
  except ConfigError as e:
    return f'--config={value}: {e}'
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


def refuse(message: str) -> None:
  """The one way a command line refuses its input: 'error: message' on stderr, exit status 2."""
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def define_run_config(argv: list[str]) -> None:
  """--config for a command that reads a trained run (evaluation, sampling): the run's own
  resolved config, DIR/config.json of the --workdir in `argv`, which `--config.x.y=...` can
  override (e.g. --config.train.eval_batch_size=128). Empty when there is no run there, or its
  config.json is unreadable: the command then says so (train.workdir.load_config)."""
  workdir = next((a.split('=', 1)[1] for a in argv if a.startswith('--workdir=')), None)
  if workdir is None and '--workdir' in argv[:-1]:
    workdir = argv[argv.index('--workdir') + 1]
  path = os.path.join(workdir or '', 'config.json')
  saved = {}
  if workdir and os.path.exists(path):
    with open(path) as f:
      try:
        saved = json.load(f)
      except json.JSONDecodeError:
        pass
  config_flags.DEFINE_config_dict('config', ml_collections.ConfigDict(saved),
                                  'The run\'s config (DIR/config.json); override its values with '
                                  '--config.x.y=...', lock_config=True)


HELP = ('--help', '-h', '--helpshort', '--helpfull')


def parse_flags(argv: list[str]) -> list[str]:
  try:
    rest = flags.FLAGS(argv)
  except SystemExit as e:  # absl exits with 1 after printing the help asked for
    if e.code == 1 and any(a in HELP for a in argv):
      sys.exit(0)
    raise
  except (AttributeError, KeyError, flags.Error) as e:
    try:
      message = _config_problem(argv)
    except Exception:  # the config file itself is broken: absl's message is the best we have
      message = None
    refuse(message or str(e))
  config = flags.FLAGS.config if 'config' in flags.FLAGS else None
  if config is not None:
    try:
      config.get  # config_flags keeps a file it could not read as a value raising OSError on use
    except OSError:
      refuse(f'--config={flags.FLAGS["config"].config_filename}: no such file; give a config '
             f'file, e.g. one of experiments/configs/ ({", ".join(_config_names())})')
  return rest


CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'experiments',
                       'configs')


def with_default_config(argv: list[str], path: str) -> list[str]:
  """argv with --config=path when it has no --config, for commands with a natural default
  config. The default goes in as a flag, not as the flag's default: config_flags would apply a
  default's --config.* overrides as the flag is defined, outside `run`'s clear error for
  unknown keys."""
  if any(a == '--config' or a.startswith('--config=') or a in HELP for a in argv):
    return argv  # with --help, not loaded: the default's imports (JAX) would only slow it
  return [argv[0], f'--config={path}', *argv[1:]]


def _config_names() -> list[str]:
  return sorted(f for f in os.listdir(CONFIGS) if f.endswith('.py') and f != '__init__.py')


def require_config(config) -> None:
  """A command whose --config has no natural default names the configs to choose from."""
  if config is None:
    from model.config import ConfigError
    raise ConfigError(f'--config is required: a config file, e.g. one of experiments/configs/ '
                      f'({", ".join(_config_names())})')


RUN_CONFIG = 'the run\'s'  # `command(config=...)` of a command that reads a trained run


def command(main, workdir_help: str, *, config: str | None = None, makes: str | None = None,
            errors: tuple[type[Exception], ...] = ()) -> None:
  """A command's --workdir (required) and --config, then `run`: the whole command line of a
  command, called once from its `if __name__ == '__main__':` block after its own flags.

  config: the file in experiments/configs/ taken when no --config is given ('grokking.py'); None
    for a command that requires one (train); RUN_CONFIG for a command that reads a trained run:
    DIR/config.json of its --workdir, overridable with --config.x.y=... (`define_run_config`).
  makes: what the command writes at --workdir: 'run' (a training run) or 'experiment' (its own
    directory; its training runs in subdirectories); None for a command that reads a training
    run there. Checked against the directory's record and recorded before `main` runs
    (train.workdir.check_command)."""
  flags.DEFINE_string('workdir', None, workdir_help)
  flags.mark_flag_as_required('workdir')
  if config == RUN_CONFIG:
    define_run_config(sys.argv)
  else:
    config_flags.DEFINE_config_file(
        'config', None, 'Experiment config file (experiments/configs/*.py)' + (
            f'; default experiments/configs/{config}' if config else '') + '.')
    if config:
      sys.argv = with_default_config(sys.argv, os.path.join(CONFIGS, config))
  run(main, makes, errors)


def run(main, makes: str | None, errors: tuple[type[Exception], ...] = ()) -> None:
  """app.run(main) with `parse_flags`; USER_ERRORS and `errors` from main are reported as one
  line, not a traceback, with exit status 2. A run stopped by a signal (train.preemption) says
  where it stopped, with 128 + the signal's number; Ctrl-C anywhere else, 130. Where libtpu is
  installed but no TPU attached, JAX starts on the CPU without trying TPU
  (`mesh.prepare_backend`, which also sets XLA's CPU flags), and libraries' log lines that
  mislead are kept out (train.errors.quiet_libraries). The --workdir is checked and
  recorded first (`command`'s `makes`); a command that fails having made nothing else there
  takes the record back (train.workdir.undone_on_failure), so the directory is as it was."""
  def main_reporting_user_errors(argv):
    # After flag parsing: --help need not import JAX.
    from train import workdir as workdir_lib
    from train.errors import USER_ERRORS, quiet_libraries
    from train.mesh import prepare_backend
    from train.preemption import Interrupted
    if len(argv) > 1:
      refuse(f'unexpected arguments {argv[1:]}; every value is given as --flag=value')
    prepare_backend()  # before main creates a JAX backend
    quiet_libraries()
    workdir = flags.FLAGS.workdir
    try:
      with workdir_lib.undone_on_failure(workdir, keep=lambda: _made_more(workdir_lib, workdir)):
        _check_and_record(workdir_lib, workdir, makes)
        return main(argv)
    except (*USER_ERRORS, *errors) as e:
      refuse(str(e))
    except Interrupted as e:
      print(e, file=sys.stderr)
      sys.exit(e.exit_code)
    except KeyboardInterrupt:
      print('interrupted', file=sys.stderr)
      sys.exit(130)

  app.run(main_reporting_user_errors, flags_parser=parse_flags)


def _check_and_record(workdir_lib, workdir: str, makes: str | None) -> None:
  """Refuses a --workdir that another command made (train.workdir.check_command); for a command
  that makes one, records it."""
  name = workdir_lib.running_command()
  if name is None:
    return
  workdir_lib.check_command(workdir, name, makes)
  if makes is not None:
    workdir_lib.record_command(workdir, makes, name)


def _made_more(workdir_lib, workdir: str) -> bool:
  """Whether `workdir` holds anything besides the command's record: what a failed command keeps
  (a training run's checkpoints, an experiment's finished stages)."""
  return os.path.isdir(workdir) and bool(set(os.listdir(workdir)) - {workdir_lib.COMMAND_FILE})
