"""Checkpoints through orbax's CheckpointManager:
DIR/checkpoints/<step>/{params,opt_state,data,checksums}.

'params' and 'opt_state' are sharded pytrees (each host writes its shards; restoring onto abstract
arrays with other shardings reshards them, so a run saved on one mesh resumes on another);
'data' is the input iterator's state as JSON. Evaluation and sampling restore 'params' alone.
'checksums' holds a fingerprint of every array saved (`_fingerprint`), checked at every restore.

What can go wrong, and what happens:
- A process killed while a checkpoint is written leaves orbax's temporary directory, never a
  step directory: orbax renames it into place only once every file is written, so the previous
  checkpoint is the latest; the next run removes the temporary directory.
- A step that cannot be read (truncated or corrupted files), or whose arrays read back other
  values than were saved (bytes damaged in place that the compression does not notice: their
  fingerprints differ from the recorded ones), is moved aside to DIR/checkpoints_unreadable/<step>
  with a one-line warning, and the run resumes from the step before it; when no step can be read
  the error names the latest one and the way out. Evaluation, sampling and `train.init_from`
  refuse such a step in one line, naming the earlier step that verifies, if one does. A step
  written before checksums were recorded is read unverified, with a one-line warning.
- Parameters or optimizer state that are not finite are never written: `save` raises
  NonFiniteError and the last good checkpoint stays the latest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging as py_logging
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging

ITEMS = ('params', 'opt_state', 'data', 'checksums')
UNREADABLE = 'checkpoints_unreadable'


class NonFiniteError(RuntimeError):
  """Training produced NaN or infinite values; the last good checkpoint is left as it was."""


class CheckpointError(RuntimeError):
  """No checkpoint of the work directory can be restored; the message says what to do."""


class StepError(CheckpointError):
  """One step cannot be trusted: it cannot be read, or it reads back other values than were
  saved. `str` is one line: 'checkpoint <step> <reason>'."""

  def __init__(self, step: int, reason: str):
    super().__init__(f'checkpoint {step} {reason}')
    self.step, self.reason = step, reason


def saved_steps(workdir: str) -> list[int]:
  """The finished steps under DIR/checkpoints, ascending (orbax's temporary directories do not
  count)."""
  directory = os.path.join(workdir, 'checkpoints')
  names = os.listdir(directory) if os.path.isdir(directory) else []
  return sorted(int(name) for name in names if name.isdigit())


def has_checkpoint(workdir: str) -> bool:
  """Whether DIR/checkpoints holds a finished step."""
  return bool(saved_steps(workdir))


@jax.jit
def all_finite(tree) -> jax.Array:
  """Whether every element of every leaf of `tree` is finite (a replicated scalar)."""
  return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _fingerprint(x: jax.Array) -> jax.Array:
  """(2,) uint32 of one array: the sum of its words (its bits as 8/16/32-bit unsigned integers)
  and the sum of word i times 2i + 1, both modulo 2**32.

  Integer sums modulo 2**32 do not depend on the order of the additions, so the value is the same
  whatever the sharding (or the number of processes) that computes it, and it is computed where
  the array lies, as one reduction, without copying it to the host. Changing any one word changes
  both sums (2i + 1 is odd, so invertible modulo 2**32); random bytes in place of many words leave
  them equal with probability about 2**-64; the weights make moved words count too."""
  if x.dtype == jnp.bool_:
    words = x.astype(jnp.uint32)
  else:
    words = jax.lax.bitcast_convert_type(
        x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize])
    words = words.astype(jnp.uint32)  # an 8-byte dtype: a trailing axis of two words
  index, stride = jnp.zeros(words.shape, jnp.uint32), 1
  for axis in reversed(range(words.ndim)):  # the flat index, built without reshaping the shards
    index += jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(stride)
    stride = stride * words.shape[axis] % 2**32
  return jnp.stack([jnp.sum(words, dtype=jnp.uint32),
                    jnp.sum(words * (2 * index + 1), dtype=jnp.uint32)])


@jax.jit
def _fingerprints(tree):
  return jax.tree.map(_fingerprint, tree)


@jax.jit
def _finite_and_fingerprints(tree):
  """(all_finite, fingerprints): one pass over the arrays at a save."""
  return all_finite(tree), _fingerprints(tree)


def _named(tree) -> dict[str, str]:
  """{'blocks/layer_0/ffn/wo/kernel': '<16 hex digits>'} of a tree of (2,) fingerprints."""
  def name(path):
    return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)
  leaves = jax.device_get(jax.tree_util.tree_flatten_with_path(tree)[0])
  return {name(path): f'{int(v[0]):08x}{int(v[1]):08x}' for path, v in leaves}


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
    finite, fingerprints = _finite_and_fingerprints({'params': params, 'opt_state': opt_state})
    if not bool(finite):
      raise NonFiniteError(f'the parameters or optimizer state are not finite at step {step}, so '
                           f'they were not saved. {self.intact_note()} Lower train.lr, raise '
                           f'train.warmup_steps or set train.grad_clip.')
    checksums = {item: _named(tree) for item, tree in fingerprints.items()}
    self.manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
        data=ocp.args.JsonSave(data_state), checksums=ocp.args.JsonSave(checksums)), force=True)

  def restore(self, step: int, abstract_params, abstract_opt_state=None):
    """(params, opt_state, data state) at `step`, laid out as the abstract trees say
    (jax.ShapeDtypeStruct leaves with shardings). Without `abstract_opt_state`, params only.
    Raises StepError when the step cannot be read or an array's fingerprint differs from the
    one recorded when it was saved; a step saved before checksums were recorded is read with a
    warning."""
    args = {'params': ocp.args.StandardRestore(abstract_params)}
    if abstract_opt_state is not None:
      args['opt_state'] = ocp.args.StandardRestore(abstract_opt_state)
      args['data'] = ocp.args.JsonRestore()
    verified = os.path.isdir(os.path.join(self.directory, str(step), 'checksums'))
    if verified:
      args['checksums'] = ocp.args.JsonRestore()
    reason = None
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # orbax raises many kinds for unreadable files  # noqa: BLE001
      reason = _reason(e)
    if reason is not None:
      _silence_failed_reads()
      raise StepError(step, f'cannot be read ({reason})') from None
    arrays = {'params': restored['params']}
    if abstract_opt_state is not None:
      arrays['opt_state'] = restored['opt_state']
    if verified:
      recorded = restored['checksums']
      for item, found in ((item, _named(_fingerprints(tree))) for item, tree in arrays.items()):
        wrong = sorted(name for name, value in found.items()
                       if recorded[item].get(name) != value)
        if wrong:
          raise StepError(step, f'is damaged: {item}/{wrong[0]}'
                                f'{f" and {len(wrong) - 1} more arrays" if len(wrong) > 1 else ""}'
                                f' read back other values than were saved (checksums differ)')
    elif jax.process_index() == 0:
      print(f'warning: checkpoint {step} in {self.directory} was written before checksums were '
            f'recorded, so it is read unverified', file=sys.stderr, flush=True)
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
      except StepError as e:
        failures.append((step, e))
    else:
      if not steps:
        return None
      step, error = failures[0]
      raise CheckpointError(
          f'no checkpoint in {self.directory} can be restored: step {step} fails: '
          f'{error}. If the config changed how the '
          f'optimizer state is shaped (train.grad_clip on/off, another optimizer), start again '
          f'with the old config; if the files are damaged, delete {self.directory} to train '
          f'from scratch, or use a new --workdir.')
    for step, error in failures:  # newer than the restored step: unreadable
      self._move_aside(step, error)
    return restored

  def _move_aside(self, step: int, error: StepError) -> None:
    target = os.path.join(self.workdir, UNREADABLE, str(step))
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(target), exist_ok=True)
      shutil.rmtree(target, ignore_errors=True)
      shutil.move(os.path.join(self.directory, str(step)), target)
      print(f'warning: {error}; moved it to {target} and resuming from an earlier step',
            file=sys.stderr, flush=True)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f'checkpoint {step} moved aside')
    self.manager.reload()

  def earlier_intact(self, step: int, abstract_params) -> int | None:
    """The newest step before `step` whose parameters read back as they were saved, or None:
    the one to suggest when `step` cannot be used."""
    for earlier in sorted((s for s in self.manager.all_steps() if s < step), reverse=True):
      try:
        self.restore(earlier, abstract_params)
        return earlier
      except StepError:
        pass
    return None

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
  """{path: (shape, dtype)} of the parameters saved at `step`, from the checkpoint's metadata;
  StepError when it cannot be read (a damaged metadata file reads as None, or raises)."""
  from flax import traverse_util
  try:
    with quietly():
      metadata = ocp.StandardCheckpointer().metadata(  # no metadata from a relative path
          os.path.abspath(os.path.join(workdir, 'checkpoints', str(step), 'params'))
      ).item_metadata
  except Exception as e:  # orbax raises many kinds for unreadable files  # noqa: BLE001
    raise StepError(step, f'cannot be read: its metadata fails ({_reason(e)})') from None
  if not metadata:
    raise StepError(step, 'cannot be read: its parameters\' metadata is missing or damaged')
  return {path: (m.shape, m.dtype)
          for path, m in traverse_util.flatten_dict(dict(metadata)).items()}


def fingerprint(workdir: str, step: int) -> str:
  """A digest of the parameters' checksums recorded at `step` of the run in `workdir` (16 hex
  digits; '' for a step saved before checksums were recorded): what a run that reads those
  parameters frozen records, to find them again."""
  checkpointer = Checkpointer(workdir, read_only=True)
  try:
    if not os.path.isdir(os.path.join(checkpointer.directory, str(step), 'checksums')):
      return ''
    checksums = checkpointer.manager.restore(
        step, args=ocp.args.Composite(checksums=ocp.args.JsonRestore()))['checksums']
  finally:
    checkpointer.close()
  text = json.dumps(checksums['params'], sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def pin(workdir: str, field: str, step: int | None = None,
        recorded: str | None = None) -> tuple[int, str]:
  """(step, fingerprint) of the run in `workdir`, which the config's `field` names and whose
  parameters another run reads (train.init_from, rl.reward_model): `step` when that run pinned
  it at its start (`recorded` its fingerprint then), else the latest. Raises CheckpointError, in
  one line, when the pinned step is gone or holds other parameters now."""
  checkpointer = Checkpointer(workdir, read_only=True)
  steps = sorted(checkpointer.manager.all_steps())
  checkpointer.close()
  if step is None:
    if not steps:
      raise CheckpointError(f'{field}={workdir} has no checkpoint yet; train it first (or longer '
                            f'than train.checkpoint_every steps)')
    step = steps[-1]
  elif step not in steps:
    raise CheckpointError(f'{field}={workdir}: its step {step}, which this run started from and '
                          f'reads ever after, is gone (steps there now: {steps or "none"}); put '
                          f'that checkpoint back, or start a new run from the one there now')
  found = fingerprint(workdir, step)
  if recorded is not None and found != recorded:
    raise CheckpointError(f'{field}={workdir}: its step {step} holds other parameters than when '
                          f'this run started from it (fingerprint {found or "none"}, recorded '
                          f'{recorded or "none"}); put that checkpoint back, or start a new run '
                          f'from the one there now')
  return step, found


def _reason(error: BaseException) -> str:
  """'ValueError: <first line>' of the error that caused `error`: orbax wraps TensorStore's
  errors in one whose text is the repr of a bound method and a spec of many lines."""
  while error.__cause__ is not None or error.__context__ is not None:
    error = error.__cause__ or error.__context__
  text = str(error).split(' See full TensorStore details')[0].strip().splitlines()
  return f'{type(error).__name__}: {text[0][:300] if text else ""}'


def _silence_failed_reads() -> None:
  """orbax reads arrays in asyncio tasks; when one fails, the others are left unfinished, and when
  they are collected (at exit, or whenever) each prints its traceback and TensorStore spec:
  hundreds of lines ('Task exception was never retrieved', 'Exception ignored in: <coroutine
  ...>', 'Event loop is closed') after the one line that said what is wrong. From the first failed
  read on, asyncio's error log and the unraisable errors of orbax's coroutines are dropped."""
  py_logging.getLogger('asyncio').setLevel(py_logging.CRITICAL)
  hook = sys.unraisablehook
  if getattr(hook, 'drops_orbax', False):
    return

  def drop_orbax(unraisable):
    code = getattr(unraisable.object, 'cr_code', None)
    orbax = code is not None and '/orbax/' in code.co_filename
    # TensorStore's reads completing after orbax closed their event loop.
    closed = str(unraisable.exc_value) == 'Event loop is closed'
    if not (orbax or closed):
      hook(unraisable)

  drop_orbax.drops_orbax = True
  sys.unraisablehook = drop_orbax


def abstract_like(tree, shardings):
  """ShapeDtypeStructs of `tree` (concrete or abstract) carrying `shardings`."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
