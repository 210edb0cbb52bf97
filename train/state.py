"""The train state's parameters: which train, which are frozen, and where they start.

  plain               every parameter trains, initialised at random
  train.init_from     every parameter starts from another run's checkpoint (its tokenizer too),
                      except those that run does not have (a reward model's scalar head), which
                      start at random: its latest step when the run begins, pinned ever after
                      (config.json's train.init_from_step and _fingerprint)
  reference           the objective reads the starting parameters as a frozen reference (DPO):
                      they are kept beside the trained copy, in `TrainState.frozen`
  lora.rank > 0       the starting parameters are frozen (`TrainState.frozen`) and only LoRA
                      adapters (and parameters the start lacks) train; the frozen base is also
                      the reference, so no second copy is held (train/lora.py)

  frozen models      other runs' models whose outputs the objective's loss reads (distillation's
                      teacher, `Objective.frozen_models`), each held whole, under its name

`Layout` says which, and turns (params, frozen) into what the model applies (`model_params`).
`TrainState.frozen` is a dict by role: 'start' holds the starting parameters kept frozen (DPO's
reference, LoRA's base), each frozen model its own name; None when there is none. Frozen
parameters are never checkpointed: they are read from their runs whenever the run starts,
resumes or is evaluated, at the pinned step: a resumed or evaluated run reads the very
parameters it started from, or is refused in one line.
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from flax import traverse_util

from model import LM
from model.config import ConfigError
from train import checkpoint as ckpt_lib
from train import lora as lora_lib
from train import tokenizers, workdir as workdir_lib


class StartRun:
  """The run `train.init_from` names: its config, tokenizer (and chat template) and checkpoint at
  `step` (the one this run pinned, whose fingerprint was `fingerprint`; default: the latest),
  read only."""

  def __init__(self, directory: str, config: ml_collections.ConfigDict,
               step: int | None = None, fingerprint: str | None = None):
    from train.chat import ChatTemplate
    self.directory = directory
    self.config = workdir_lib.load_config(directory)
    if self.config is None:
      raise workdir_lib.RunError(f'train.init_from={directory} holds no run (no '
                                 f'{workdir_lib.CONFIG_FILE}); give the --workdir of a trained run')
    diffs = workdir_lib.model_differences(self.config.model.to_dict(), config.model.to_dict())
    diffs += workdir_lib.differences(self.config.to_dict(), config.to_dict(),
                                     ['data.tokenizer', 'data.vocab_size'])
    if diffs:
      raise workdir_lib.RunError(
          f'train.init_from={directory} holds a run of another model shape or tokenizer, so its '
          f'parameters do not fit this config: ' + '; '.join(diffs)
          + '. Give this run the model and tokenizer settings of that one.')
    self.tokenizer = tokenizers.load(os.path.join(directory, 'tokenizer'))
    self.template = ChatTemplate.load(os.path.join(directory, 'tokenizer'))
    self.step, self.fingerprint = ckpt_lib.pin(directory, 'train.init_from', step, fingerprint)
    try:
      self.shapes = ckpt_lib.params_metadata(directory, self.step)  # {path: (shape, dtype)}
    except ckpt_lib.StepError as e:
      raise ckpt_lib.CheckpointError(
          f'train.init_from={directory}: {e}; resume training there (python -m train '
          f'--workdir={directory}), which sets step {self.step} aside and goes on from the step '
          f'before it') from None
    self.paths = set(self.shapes)

  def params(self, abstract_params):
    """The parameters at `self.step` that `abstract_params` (ShapeDtypeStructs with shardings,
    a subtree of the checkpoint's) names, laid out as it says; the checkpoint's others are read
    replicated and dropped. Raises CheckpointError, in one line, when that step cannot be read
    or is damaged."""
    wanted = traverse_util.flatten_dict(abstract_params)
    mesh = next(iter(wanted.values())).sharding.mesh
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    target = {path: wanted.get(path, jax.ShapeDtypeStruct(shape, dtype, sharding=replicated))
              for path, (shape, dtype) in self.shapes.items()}
    target = traverse_util.unflatten_dict(target)
    checkpointer = ckpt_lib.Checkpointer(self.directory, read_only=True)
    try:
      restored = checkpointer.restore(self.step, target)[0]
    except ckpt_lib.StepError as e:
      earlier = checkpointer.earlier_intact(self.step, target)
      raise ckpt_lib.CheckpointError(
          f'train.init_from={self.directory}: {e}; '
          + (f'its step {earlier} reads back as saved: resume training there (python -m train '
             f'--workdir={self.directory}), which sets step {self.step} aside'
             if earlier is not None else 'no earlier step of it reads back as saved either')
      ) from None
    finally:
      checkpointer.close()
    flat = traverse_util.flatten_dict(restored)
    return traverse_util.unflatten_dict({path: flat[path] for path in wanted})


def recorded_pin(saved, config, field: str) -> tuple[int | None, str | None]:
  """(step, fingerprint) that the run's saved config (None for a new run) recorded for the run
  its `field` names ('train.init_from', 'rl.reward_model': as `<field>_step` and
  `<field>_fingerprint`), when `config` names the same directory; else (None, None), and the
  latest step of that run is pinned when this one begins."""
  section, key = field.split('.')
  if saved is None or saved[section].get(f'{key}_step') is None:
    return None, None
  if os.path.abspath(saved[section][key]) != os.path.abspath(config[section][key]):
    return None, None
  return saved[section][f'{key}_step'], saved[section].get(f'{key}_fingerprint', '')


def _split(tree, keep: set):
  """(the leaves whose flattened path is in `keep`, the rest), as two nested dicts."""
  flat = traverse_util.flatten_dict(tree, is_leaf=lambda _, x: isinstance(x, nn.Partitioned))
  inside = {k: v for k, v in flat.items() if k in keep}
  outside = {k: v for k, v in flat.items() if k not in keep}
  return traverse_util.unflatten_dict(inside), traverse_util.unflatten_dict(outside)


def union(a, b):
  """The leaves of both nested dicts (b's where both have one)."""
  flat = traverse_util.flatten_dict(a)
  flat.update(traverse_util.flatten_dict(b))
  return traverse_util.unflatten_dict(flat)


def abstract_params(model: LM, head: str = 'logits'):
  """The parameters `model` applies with `head`: their boxed abstract tree, nothing allocated."""
  return jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 1), jnp.int32), head=head))['params']


class Layout:
  """Which parameters of `model` (applied with `head`) train and which are frozen."""

  def __init__(self, model: LM, head: str = 'logits', start: StartRun | None = None,
               reference: bool = False, lora=None, frozen_models: dict[str, LM] | None = None):
    self.model, self.head, self.start = model, head, start
    self.frozen_models = dict(frozen_models or {})
    self.rank = int(lora.rank) if lora is not None else 0
    self.lora = lora
    if (reference or self.rank) and start is None:
      raise ConfigError('a reference model and LoRA need the run to start from another: set '
                        'train.init_from (e.g. --init_from=runs/sft)')
    self.full = abstract_params(model, head)
    if start is not None:
      self.started, self.new = _split(self.full, start.paths)
    else:
      self.started, self.new = {}, self.full
    self.has_frozen = bool(self.rank) or reference  # the started parameters are held frozen

  def init_trainable(self, key):
    """The trained parameters at step 0, boxed with logical names (under jit): all of them, or
    {'adapters': LoRA's, 'new': those the start lacks}."""
    full = self.model.init(key, jnp.zeros((1, 1), jnp.int32), head=self.head)['params']
    if not self.rank:
      return full
    started, new = _split(full, set(traverse_util.flatten_dict(
        self.started, is_leaf=lambda _, x: isinstance(x, nn.Partitioned))))
    adapters = lora_lib.init_adapters(started, self.rank, tuple(self.lora.targets),
                                      jax.random.fold_in(key, 1))
    return {'adapters': adapters, 'new': new}

  def abstract_frozen(self):
    """The frozen parameters' boxed abstract tree, {role: parameters}, or None."""
    frozen = {name: abstract_params(m) for name, m in self.frozen_models.items()}
    if self.has_frozen:
      frozen['start'] = self.started
    return frozen or None

  def model_params(self, params, frozen):
    """What the model applies: the trained parameters, or LoRA's merge with the frozen base."""
    if not self.rank:
      return params
    merged = lora_lib.merge(frozen['start'], params['adapters'], self.rank, float(self.lora.alpha))
    return union(merged, params['new'])
