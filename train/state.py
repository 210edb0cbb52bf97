"""The train state's parameters: which train, which are frozen, and where they start.

  plain               every parameter trains, initialised at random
  train.init_from     every parameter starts from another run's latest checkpoint (its
                      tokenizer too), except those that run does not have (a reward model's
                      scalar head), which start at random
  reference           the objective reads the starting parameters as a frozen reference (DPO):
                      they are kept beside the trained copy, in `TrainState.frozen`
  lora.rank > 0       the starting parameters are frozen (`TrainState.frozen`) and only LoRA
                      adapters (and parameters the start lacks) train; the frozen base is also
                      the reference, so no second copy is held (train/lora.py)

`Layout` says which, and turns (params, frozen) into what the model applies (`model_params`) and
what an objective's reference is (`frozen` itself). Frozen parameters are never checkpointed:
they are read from the run they start from whenever the run starts or resumes.
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
  """The run `train.init_from` names: its config, tokenizer (and chat template) and latest
  checkpoint, read only."""

  def __init__(self, directory: str, config: ml_collections.ConfigDict):
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
    checkpointer = ckpt_lib.Checkpointer(directory, read_only=True)
    self.step = checkpointer.latest_step()
    checkpointer.close()
    if self.step is None:
      raise workdir_lib.RunError(f'train.init_from={directory} has no checkpoint yet; train it '
                                 f'first (or longer than train.checkpoint_every steps)')
    self.shapes = ckpt_lib.params_metadata(directory, self.step)  # {path: (shape, dtype)}
    self.paths = set(self.shapes)

  def params(self, abstract_params):
    """The parameters at the latest step that `abstract_params` (ShapeDtypeStructs with
    shardings, a subtree of the checkpoint's) names, laid out as it says; the checkpoint's others
    are read replicated and dropped."""
    wanted = traverse_util.flatten_dict(abstract_params)
    mesh = next(iter(wanted.values())).sharding.mesh
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    target = {path: wanted.get(path, jax.ShapeDtypeStruct(shape, dtype, sharding=replicated))
              for path, (shape, dtype) in self.shapes.items()}
    checkpointer = ckpt_lib.Checkpointer(self.directory, read_only=True)
    try:
      restored = checkpointer.restore(self.step, traverse_util.unflatten_dict(target))[0]
    finally:
      checkpointer.close()
    flat = traverse_util.flatten_dict(restored)
    return traverse_util.unflatten_dict({path: flat[path] for path in wanted})


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


class Layout:
  """Which parameters of `model` (applied with `head`) train and which are frozen."""

  def __init__(self, model: LM, head: str = 'logits', start: StartRun | None = None,
               reference: bool = False, lora=None):
    self.model, self.head, self.start = model, head, start
    self.rank = int(lora.rank) if lora is not None else 0
    self.lora = lora
    if (reference or self.rank) and start is None:
      raise ConfigError('a reference model and LoRA need the run to start from another: set '
                        'train.init_from (e.g. --init_from=runs/sft)')
    self.full = jax.eval_shape(lambda: model.init(
        jax.random.key(0), jnp.zeros((1, 1), jnp.int32), head=head))['params']  # boxed
    if start is not None:
      self.started, self.new = _split(self.full, start.paths)
    else:
      self.started, self.new = {}, self.full
    self.has_frozen = bool(self.rank) or reference

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
    """The frozen parameters' boxed abstract tree, or None."""
    return self.started if self.has_frozen else None

  def start_values(self, abstract_started):
    """The started parameters read from the start run (laid out as `abstract_started` says)."""
    return self.start.params(abstract_started)

  def model_params(self, params, frozen):
    """What the model applies: the trained parameters, or LoRA's merge with the frozen base."""
    if not self.rank:
      return params
    merged = lora_lib.merge(frozen, params['adapters'], self.rank, float(self.lora.alpha))
    return union(merged, params['new'])
