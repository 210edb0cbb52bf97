"""Training objectives: what the one training loop (train/loop.py) optimises.

An objective is a loss function, the batches it eats and the tokens they hold, chosen by
`train.objective`: a name below, or `module:Class` for one defined elsewhere (an experiment's
own, e.g. `experiments.recall.objective:Recall`):

  lm       next-token prediction on a text corpus (pretraining; the default)      lm.py
  sft      supervised fine-tuning on demonstrations, loss on the assistant's turns sft.py
  reward   a reward model: a scalar head, Bradley-Terry loss on preference pairs   reward.py
  dpo      direct preference optimisation against the frozen starting model        dpo.py
  grpo     RL from a reward function, group-relative advantages (no critic)        rl.py
  ppo      RLHF: PPO with a value head against a learned reward model               rl.py
  distill  knowledge distillation: KL to a frozen teacher run's logits, mixed with CE distill.py

The loop owns everything else (mesh, state, checkpoints and exact resume, metrics, progress); it
asks the objective for its data, its batches and its loss and evaluation functions (see
`Objective`). A new objective is one module and one line in OBJECTIVES. The table names modules
rather than importing them: an objective module may read other runs (RL's reward model,
distillation's teacher, through train/restore.py, which resolves objectives by name), and
nothing registers by being imported.
"""

from __future__ import annotations

import importlib

from model.config import ConfigError
from train.objectives.base import Objective

OBJECTIVES: dict[str, str] = {
    'lm': 'train.objectives.lm:LanguageModeling',
    'sft': 'train.objectives.sft:SFT',
    'reward': 'train.objectives.reward:RewardModel',
    'dpo': 'train.objectives.dpo:DPO',
    'grpo': 'train.objectives.rl:GRPO',
    'ppo': 'train.objectives.rl:PPO',
    'distill': 'train.objectives.distill:Distillation',
}


def resolve(name: str) -> type[Objective]:
  """The objective class `name` gives: a name in OBJECTIVES or 'module:Class'."""
  target = OBJECTIVES.get(name, name)
  module_name, _, attribute = target.partition(':')
  if not attribute:
    raise ConfigError(f'train.objective={name!r} is not known; choose one of '
                      f'{sorted(OBJECTIVES)} or give module:Class')
  try:
    cls = getattr(importlib.import_module(module_name), attribute)
  except (ImportError, AttributeError) as e:
    raise ConfigError(f'train.objective={name!r}: cannot import {target} ({e})') from e
  if not (isinstance(cls, type) and issubclass(cls, Objective)):
    raise ConfigError(f'train.objective={name!r}: {target} is not an Objective subclass')
  return cls


def make(config) -> Objective:
  """The objective `config.train.objective` names, checked against the config."""
  objective = resolve(config.train.objective)(config)
  objective.check()
  return objective


__all__ = ['OBJECTIVES', 'Objective', 'make', 'resolve']
