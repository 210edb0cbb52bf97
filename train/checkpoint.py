"""Checkpoints through orbax's CheckpointManager: DIR/checkpoints/<step>/{params,opt_state,data}.

'params' and 'opt_state' are sharded pytrees (each host writes its shards; restoring onto abstract
arrays with other shardings reshards them, so a run saved on one mesh resumes on another);
'data' is the input iterator's state as JSON. Evaluation and sampling restore 'params' alone.

What can go wrong, and what happens:
- A process killed while a checkpoint is written leaves orbax's temporary directory, never a
  step directory: orbax renames it into place only once every file is written, so the previous
  checkpoint is the latest; the next run removes the temporary directory.
- A step that cannot be read (truncated or corrupted files) is moved aside to
  DIR/checkpoints_unreadable/<step> with a warning, and the run resumes from the step before it;
  when no step can be read the error names the latest one and the way out.
- Parameters or optimizer state that are not finite are never written: `save` raises
  NonFiniteError and the last good checkpoint stays the latest.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging

ITEMS = ('params', 'opt_state', 'data')
UNREADABLE = 'checkpoints_unreadable'


class NonFiniteError(RuntimeError):
  """Training produced NaN or infinite values; the last good checkpoint is left as it was."""


class CheckpointError(RuntimeError):
  """No checkpoint of the work directory can be restored; the message says what to do."""


def has_checkpoint(workdir: str) -> bool:
  """Whether DIR/checkpoints holds a finished step (orbax's temporary directories do not count)."""
  directory = os.path.join(workdir, 'checkpoints')
  return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


@jax.jit
def all_finite(tree) -> jax.Array:
  """Whether every element of every leaf of `tree` is finite (a replicated scalar)."""
  return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


class Checkpointer:

  def __init__(self, workdir: str, keep: int = 3, read_only: bool = False):
    self.workdir = workdir
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    if read_only:  # for evaluation and sampling: orbax warns that a reader saves nothing
      options = ocp.CheckpointManagerOptions(read_only=True, create=False, max_to_keep=None,
                                             save_interval_steps=0)
      with quietly():
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
    else:  # a writer removes the temporary directories of saves that a killed process left
      options = ocp.CheckpointManagerOptions(max_to_keep=keep, cleanup_tmp_directories=True)
      self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def intact_note(self) -> str:
    """One sentence on the checkpoint a failed run leaves: the latest, or none."""
    self.wait()
    last = self.latest_step()
    if last is None:
      return 'No checkpoint was written.'
    return f'The last good checkpoint, step {last}, is intact in {self.directory}.'

  def save(self, step: int, params, opt_state, data_state: dict) -> None:
    """Saves in the background; `wait` blocks until it is on disk. Raises NonFiniteError, writing
    nothing, when the parameters or the optimizer state hold a NaN or an infinity."""
    if not bool(all_finite((params, opt_state))):
      raise NonFiniteError(f'the parameters or optimizer state are not finite at step {step}, so '
                           f'they were not saved. {self.intact_note()} Lower train.lr, raise '
                           f'train.warmup_steps or set train.grad_clip.')
    self.manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
        data=ocp.args.JsonSave(data_state)), force=True)

  def restore(self, step: int, abstract_params, abstract_opt_state=None):
    """(params, opt_state, data state) at `step`, laid out as the abstract trees say
    (jax.ShapeDtypeStruct leaves with shardings). Without `abstract_opt_state`, params only."""
    args = {'params': ocp.args.StandardRestore(abstract_params)}
    if abstract_opt_state is not None:
      args['opt_state'] = ocp.args.StandardRestore(abstract_opt_state)
      args['data'] = ocp.args.JsonRestore()
    restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    return restored['params'], restored.get('opt_state'), restored.get('data')

  def restore_latest(self, abstract_params, abstract_opt_state=None):
    """(step, params, opt_state, data state) of the newest step that can be read, or None when
    there is no checkpoint. Unreadable newer steps are moved aside, with a warning each."""
    steps = sorted(self.manager.all_steps(), reverse=True)
    failures = []
    for step in steps:
      try:
        restored = (step, *self.restore(step, abstract_params, abstract_opt_state))
        break
      except Exception as e:  # orbax raises many kinds for unreadable files  # noqa: BLE001
        failures.append((step, e))
    else:
      if not steps:
        return None
      step, error = failures[0]
      raise CheckpointError(
          f'no checkpoint in {self.directory} can be restored: step {step} fails with '
          f'{type(error).__name__}: {_first_line(error)}. If the config changed how the '
          f'optimizer state is shaped (train.grad_clip on/off, another optimizer), start again '
          f'with the old config; if the files are damaged, delete {self.directory} to train '
          f'from scratch, or use a new --workdir.')
    for step, error in failures:  # newer than the restored step: unreadable
      self._move_aside(step, error)
    return restored

  def _move_aside(self, step: int, error: Exception) -> None:
    target = os.path.join(self.workdir, UNREADABLE, str(step))
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(target), exist_ok=True)
      shutil.rmtree(target, ignore_errors=True)
      shutil.move(os.path.join(self.directory, str(step)), target)
      print(f'warning: checkpoint {step} cannot be read ({type(error).__name__}: '
            f'{_first_line(error)}); moved it to {target} and resuming from an earlier step',
            file=sys.stderr, flush=True)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f'checkpoint {step} moved aside')
    self.manager.reload()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


@contextlib.contextmanager
def quietly():
  """orbax's warnings off: those about reading (a read-only manager saves nothing; one item of a
  step has no step metadata of its own) say nothing wrong."""
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    yield
  finally:
    logging.set_verbosity(verbosity)


def params_metadata(workdir: str, step: int) -> dict:
  """{path: (shape, dtype)} of the parameters saved at `step`, from the checkpoint's metadata."""
  from flax import traverse_util
  with quietly():
    metadata = ocp.StandardCheckpointer().metadata(  # orbax reads no metadata from a relative path
        os.path.abspath(os.path.join(workdir, 'checkpoints', str(step), 'params'))).item_metadata
  return {path: (m.shape, m.dtype)
          for path, m in traverse_util.flatten_dict(dict(metadata)).items()}


def _first_line(error: Exception) -> str:
  text = str(error).strip().splitlines()
  return text[0][:300] if text else ''


def abstract_like(tree, shardings):
  """ShapeDtypeStructs of `tree` (concrete or abstract) carrying `shardings`."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
