"""Loads a trained run from its work directory: for evaluation, sampling, a reward model that
scores an RL run's rollouts, and every experiment that reads a run."""

from __future__ import annotations

import dataclasses
import filecmp
import os

from typing import Any

import flax.linen as nn
import jax
import ml_collections

from model import LM, ModelConfig
from train import checkpoint as ckpt_lib
from train import mesh as mesh_lib
from train import objectives, tokenizers, workdir as workdir_lib
from train.chat import ChatTemplate
from train.evaluate import sharded_eval_step
from train.state import Layout, StartRun


@dataclasses.dataclass
class TrainedRun:
  config: ml_collections.ConfigDict
  model_cfg: ModelConfig
  model: LM
  tokenizer: tokenizers.Tokenizer
  params: dict          # what the model applies (a LoRA run's adapters merged into its base)
  step: int
  mesh: object
  frozen: Any = None    # {'start': the frozen starting parameters} (DPO, LoRA), when any
  template: Any = None  # the chat template of a post-trained run (train/chat.py)
  objective: Any = None
  head: str = 'logits'

  def eval_step(self):
    """The objective's evaluation step for these parameters (train.evaluate.sharded_eval_step)."""
    shardings = jax.tree.map(lambda x: x.sharding, (self.params, self.frozen))
    return sharded_eval_step(self.objective, self.model, self.mesh, *shardings)


def load_run(workdir: str, step: int | None = None,
             config: ml_collections.ConfigDict | None = None) -> TrainedRun:
  """The run's config (`config` when given: the saved one with a command's overrides),
  tokenizer and parameters at `step` (default: the latest checkpoint), verified against the
  checksums recorded when they were saved. A run whose objective reads frozen parameters (LoRA's
  base, DPO's reference) reads them from the run it started from, at the step it pinned, as
  training does (train/state.py). A step that cannot be used is refused in one line, naming the
  newest earlier step that reads back as saved, if one does."""
  config = config if config else workdir_lib.load_config(workdir)
  if config is None:
    raise workdir_lib.RunError(f'{workdir} holds no run (no {workdir_lib.CONFIG_FILE}); train one '
                               f'with python -m train --workdir={workdir}')
  tokenizer = tokenizers.load(f'{workdir}/tokenizer')
  model_cfg = workdir_lib.resolve_model_config(config.model, tokenizer.vocab_size)
  model = LM(model_cfg)
  objective = objectives.make(config)
  lora = config.lora if config.lora.rank > 0 else None
  start = (StartRun(config.train.init_from, config, config.train.get('init_from_step'),
                    config.train.get('init_from_fingerprint'))
           if objective.reference or lora is not None else None)
  layout = Layout(model, objective.head, start, objective.reference, lora)
  mesh = mesh_lib.make_mesh(config.mesh) if _fits(config.mesh) else mesh_lib.make_mesh(
      {'data': -1, 'fsdp': 1, 'tensor': 1, 'expert': 1})
  checkpointer = ckpt_lib.Checkpointer(workdir, read_only=True)
  step = checkpointer.latest_step() if step is None else step
  if step is None:
    raise workdir_lib.RunError(f'{workdir} has no checkpoint yet; train longer than '
                               f'train.checkpoint_every steps or until the end')
  boxed = jax.eval_shape(layout.init_trainable, jax.random.key(0))
  abstract = ckpt_lib.abstract_like(nn.unbox(boxed), mesh_lib.logical_shardings(boxed, mesh))
  try:
    params, _, _ = checkpointer.restore(step, abstract)
  except ckpt_lib.StepError as e:
    earlier = checkpointer.earlier_intact(step, abstract)
    raise ckpt_lib.CheckpointError(
        f'{e} (in {workdir})' + (
            f'; step {earlier} reads back as saved: use --step={earlier}, or resume training, '
            f'which sets step {step} aside' if earlier is not None else
            '; no earlier step reads back as saved either')) from None
  finally:
    checkpointer.close()
  frozen = None
  if layout.has_frozen:
    frozen = {'start': start.params(ckpt_lib.abstract_like(
        nn.unbox(layout.started), mesh_lib.logical_shardings(layout.started, mesh)))}
  return TrainedRun(config, model_cfg, model, tokenizer, layout.model_params(params, frozen),
                    step, mesh, frozen, ChatTemplate.load(f'{workdir}/tokenizer'), objective,
                    objective.head)


def same_tokenizer(workdir: str, other: str) -> bool:
  """Whether two runs saved the same tokenizer (its files, byte for byte): what a draft model
  must share with its target (model/speculative.py)."""
  a, b = f'{workdir}/tokenizer', f'{other}/tokenizer'
  names = sorted(os.listdir(a))
  return names == sorted(os.listdir(b)) and all(
      filecmp.cmp(f'{a}/{n}', f'{b}/{n}', shallow=False) for n in names)


def _fits(mesh_cfg) -> bool:
  """Whether the training mesh fits the devices here; if not, evaluation uses plain data
  parallelism (parameters are resharded on restore)."""
  try:
    mesh_lib.make_mesh(mesh_cfg)
    return True
  except mesh_lib.MeshError:
    return False
