"""Training objectives: what the one training loop (train/loop.py) optimises.

An objective is a loss function plus the batches it eats, chosen by `train.objective`:

  lm       next-token prediction on a text corpus (pretraining; the default)      lm.py
  sft      supervised fine-tuning on demonstrations, loss on the assistant's turns sft.py
  reward   a reward model: a scalar head, Bradley-Terry loss on preference pairs   reward.py
  dpo      direct preference optimisation against the frozen starting model        dpo.py
  grpo     RL from a reward function, group-relative advantages (no critic)        rl.py
  ppo      RLHF: PPO with a value head against a learned reward model               rl.py

The loop owns everything else (mesh, state, checkpoints and exact resume, metrics, progress); it
asks the objective for its data, its batches and its loss and evaluation functions (see
`Objective`). A new objective is one module and one line in OBJECTIVES.
"""

from __future__ import annotations

from model.config import ConfigError
from train.objectives.base import Objective
from train.objectives.dpo import DPO
from train.objectives.lm import LanguageModeling
from train.objectives.reward import RewardModel
from train.objectives.rl import GRPO, PPO
from train.objectives.sft import SFT

OBJECTIVES: dict[str, type[Objective]] = {
    'lm': LanguageModeling, 'sft': SFT, 'reward': RewardModel, 'dpo': DPO, 'grpo': GRPO,
    'ppo': PPO}


def make(config) -> Objective:
  """The objective `config.train.objective` names, checked against the config."""
  name = config.train.objective
  if name not in OBJECTIVES:
    raise ConfigError(f'train.objective={name!r} is not known; choose one of '
                      f'{sorted(OBJECTIVES)}')
  objective = OBJECTIVES[name](config)
  objective.check()
  return objective


__all__ = ['OBJECTIVES', 'Objective', 'make']
