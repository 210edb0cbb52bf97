"""Defaults every config starts from. Each section is overridable from the command line:

  python -m train --config=experiments/configs/shakespeare_char.py --workdir=/tmp/run \
      --config.model.pattern='attn:mlp,attn:moe' --config.train.num_steps=500

A config may offer presets, named after a colon (ml_collections passes the text after ':' to
`get_config`): `--config=experiments/configs/grokking.py:quick`. Every experiment's `quick` preset
shows its result, in the same files as its default, in a minute or a few on a 2-core CPU; its
docstring gives the command and the wall time it took on the shared 2-core AMD EPYC (AVX2) at
the load average given, which other jobs made 3-10 (`with_preset`).
"""

import dataclasses
import os
import typing

from ml_collections import ConfigDict, config_dict

from model.config import ConfigError, ModelConfig
from train import lora

# ../shared/data beside the project root: read-only data that tests, CI and benchmarks use.
SHARED_DATA = os.path.normpath(os.path.join(os.path.dirname(__file__), '..', '..', '..',
                                            'shared', 'data'))
TINY_SHAKESPEARE = os.path.join(SHARED_DATA, 'tinyshakespeare', 'input.txt')


def _section(obj) -> ConfigDict:
  """A dataclass instance as a ConfigDict; None fields become typed placeholders, so that
  `--config.model.d_ff=512` can set a field whose default is None."""
  hints = typing.get_type_hints(type(obj))
  out = ConfigDict()
  for field in dataclasses.fields(obj):
    value = getattr(obj, field.name)
    if dataclasses.is_dataclass(value):
      out[field.name] = _section(value)
    elif value is None:
      kind = next(a for a in typing.get_args(hints[field.name]) if a is not type(None))
      out[field.name] = config_dict.placeholder(kind)
    else:
      out[field.name] = value
  return out


def model_config(**overrides) -> ConfigDict:
  """All ModelConfig fields. vocab_size 0 means 'the tokenizer's vocabulary size'."""
  section = _section(ModelConfig())
  section.vocab_size = 0
  section.update(overrides)
  return section


def with_preset(config: ConfigDict, preset: str, **presets: dict) -> ConfigDict:
  """`config` as the preset named `preset` changes it ('': unchanged, the default). Each preset
  is a dict of dotted paths to values, what `--config.<path>=<value>` would set, e.g.
  `quick={'train.num_steps': 200}`; a path the config lacks is an error, as on the command line."""
  if not preset:
    return config
  if preset not in presets:
    choose = f'choose {" or ".join(map(repr, presets))}, or' if presets else 'it has none; give'
    raise ConfigError(f'unknown preset {preset!r}: {choose} the file alone for the default')
  for path, value in presets[preset].items():
    *parents, leaf = path.split('.')
    node = config
    for part in parents:
      node = node[part]
    if leaf not in node:
      raise ConfigError(f'preset {preset!r} sets {path}, which the config does not have')
    node[leaf] = value
  return config


def get_config(preset: str = '') -> ConfigDict:
  c = ConfigDict()
  c.model = model_config()

  c.data = ConfigDict(dict(
      path='',                  # a text file or a directory of *.txt files (TFDS manual dir)
      tfds_name='',             # or a TFDS catalog dataset, e.g. 'lm1b'
      tfds_fallback='',         # catalog dataset to use when `path` does not exist
      tfds_data_dir='',         # where TFDS prepares datasets; '' is TFDS's default
      text_key='text',          # the text feature of a catalog dataset
      train_split='train',
      val_split='validation',
      val_fraction=0.1,         # for `path` corpora: the last 10% of each file's characters
      tokenizer='char',         # char | byte | bpe | unigram
      vocab_size=0,             # for bpe / unigram
      seq_len=256,              # training context length
  ))

  c.train = ConfigDict(dict(
      num_steps=1000,
      batch_size=32,            # global batch, in sequences
      grad_accum_steps=1,       # micro-batches per step (the batch is split, gradients summed)
      lr=1e-3,
      min_lr=1e-4,              # learning rate at the end of the decay
      warmup_steps=100,
      schedule='cosine',        # cosine | linear | constant (after linear warmup)
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      weight_decay=0.1,
      weight_decay_exclude=('scale', 'bias', 'A_log', 'D'),  # names of parameters never decayed
      grad_clip=1.0,            # global-norm clipping; 0 disables
      seed=0,
      steps_per_call=10,        # train steps per compiled call (lax.scan): less dispatch overhead
      log_every=50,
      eval_every=250,
      eval_batches=20,          # batches per periodic eval; the final eval reads the whole split
      eval_batch_size=64,
      checkpoint_every=500,
      keep_checkpoints=3,
      peak_flops=0.0,           # device peak for MFU; 0 measures a matmul at start-up
      init_from='',             # a run directory to start from: its parameters and tokenizer
      objective='lm',           # lm | sft | reward | dpo | grpo | ppo | distill (objectives/)
  ))

  # Post-training (train/objectives/): conversations in a chat template, LoRA, DPO's settings.
  c.chat = ConfigDict(dict(system='<|system|>\n', user='<|user|>\n', assistant='<|assistant|>\n',
                           end_of_turn='<|end|>\n'))   # a run started from another takes its
  c.lora = ConfigDict(dict(rank=0,                     # 0: every parameter trains
                           alpha=16.0,                 # the update is alpha / rank x A B
                           targets=lora.DEFAULT_TARGETS))
  c.reward = ConfigDict(dict(lm_weight=0.0))           # + this x the chosen answer's NLL/token
  c.dpo = ConfigDict(dict(beta=0.1,                    # strength of the KL anchor to the reference
                          label_smoothing=0.0,         # conservative DPO: assumed label noise
                          nll_weight=0.0))             # RPO: + this x the chosen answer's NLL/token
  # Reinforcement learning (train/objectives/rl.py): GRPO and PPO.
  c.rl = ConfigDict(dict(
      reward='',                 # module:function scoring (prompt, response, **fields)
      accuracy='',               # module:function logged as accuracy (e.g. exact match)
      reward_model='',           # or the work directory of a reward-model run: its score
      group_size=4,              # answers sampled per prompt (GRPO's group)
      max_new_tokens=16,
      temperature=1.0,
      top_p=1.0,
      ppo_epochs=1,              # passes over each rollout
      num_minibatches=1,         # optimizer steps per pass
      epsilon=0.2,               # PPO's clip range of the probability ratio
      beta=0.04,                 # KL to the reference: in the loss (GRPO), in the reward (PPO)
      scale_rewards=True,        # GRPO: divide by the group's std (Dr. GRPO: False)
      loss_normalization='token',  # token | sequence
      gamma=1.0,                 # PPO's GAE
      lam=0.95,
      vf_coef=0.1,               # PPO's value-loss weight
      value_clip=0.2,
  ))

  # Distillation (train/objectives/distill.py): a student learns a frozen teacher run's logits.
  c.distill = ConfigDict(dict(teacher='',              # the teacher run's work directory
                              temperature=2.0,         # T: both distributions softened by it
                              alpha=0.5,               # alpha T^2 KL + (1 - alpha) CE
                              top_k=0))                # > 0: the teacher's top k logits only

  c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1))  # -1: the remaining devices
  return with_preset(c, preset)
