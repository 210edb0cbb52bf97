"""The post-training task: integer addition, whose answers can be checked.

Problems a + b with operands in [0, task.max_operand] form a TFDS dataset generated in process
(`AdditionProblems`, like experiments/grokking/arithmetic.py): disjoint 'train' and 'test' splits
of distinct pairs, seeded. From the training problems come

  documents      the base model's corpus: every problem stated `task.passes` times, as an
                 equation (`task.equation_share` of the lines) or in prose, each statement wrong
                 with probability `task.error_rate`, as text on the web is
  demonstrations SFT's JSON lines, {"prompt": "What is 17 + 25?", "response": "42", "answer": 42}
  pairs          the reward model's JSON lines: the right answer against a wrong one (off by a
                 small amount, or a digit changed: the errors a model makes)

and the test problems are held out for every stage's exact-match accuracy.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import tensorflow_datasets as tfds

from model.config import ConfigError
from train.data import generated_records


def question(a: int, b: int) -> str:
  return f'What is {a} + {b}?'


def equation(a: int, b: int) -> str:
  """The base corpus's (and the few-shot prompt's) own format."""
  return f'{a} + {b} ='


class AdditionConfig(tfds.core.BuilderConfig):
  def __init__(self, *, max_operand: int, num_train: int, num_test: int, seed: int, **kwargs):
    super().__init__(name=f'max{max_operand}_train{num_train}_test{num_test}_seed{seed}',
                     **kwargs)
    self.max_operand, self.num_train, self.num_test, self.seed = (max_operand, num_train,
                                                                  num_test, seed)


class AdditionProblems(tfds.core.GeneratorBasedBuilder):
  """Distinct pairs (a, b), shuffled with a seed and cut into train and test."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self) -> tfds.core.DatasetInfo:
    scalar = tfds.features.Scalar(np.int64)
    return tfds.core.DatasetInfo(builder=self, description='Integer addition problems.',
                                 disable_shuffling=True,
                                 features=tfds.features.FeaturesDict({'a': scalar, 'b': scalar}))

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    n = cfg.max_operand + 1
    order = np.random.default_rng(cfg.seed).permutation(n * n)[:cfg.num_train + cfg.num_test]
    pairs = np.stack([order // n, order % n], axis=1)
    return {'train': self._generate_examples(pairs[:cfg.num_train]),
            'test': self._generate_examples(pairs[cfg.num_train:])}

  def _generate_examples(self, pairs):
    for i, (a, b) in enumerate(pairs):
      yield i, {'a': int(a), 'b': int(b)}


@dataclasses.dataclass(frozen=True)
class Problems:
  train: np.ndarray   # (N, 2) operands
  test: np.ndarray


def load(task_cfg) -> Problems:
  n = task_cfg.max_operand + 1
  if task_cfg.num_train + task_cfg.num_test > n * n:
    raise ConfigError(f'task.num_train + task.num_test = {task_cfg.num_train + task_cfg.num_test} '
                      f'problems, but operands up to {task_cfg.max_operand} make only {n * n}')
  config = AdditionConfig(max_operand=task_cfg.max_operand, num_train=task_cfg.num_train,
                          num_test=task_cfg.num_test, seed=task_cfg.seed,
                          version=AdditionProblems.VERSION)
  builder = AdditionProblems(config=config, data_dir=task_cfg.tfds_data_dir or None,
                             file_format='array_record')
  splits = {split: np.asarray([[r['a'], r['b']] for r in records], np.int64)
            for split, records in generated_records(builder).items()}
  return Problems(splits['train'], splits['test'])


@dataclasses.dataclass(frozen=True)
class StageProblems:
  demonstrations: np.ndarray  # SFT's
  rl: np.ndarray              # the RL stages' prompts: no other stage sees them
  pairs: np.ndarray           # the reward model's


def stage_problems(train: np.ndarray, task_cfg) -> StageProblems:
  """The training problems each stage draws on: SFT's demonstrations first, then the RL prompts,
  which no other stage sees (so RLHF's reward model has not been trained on the questions it
  scores); the reward model's pairs come from every other problem, demonstrations included."""
  d, r, p = task_cfg.num_demonstrations, task_cfg.num_rl_prompts, task_cfg.num_pairs
  if d + r > len(train) or p > len(train) - r:
    raise ConfigError(f'task.num_demonstrations={d} and task.num_rl_prompts={r} must fit in '
                      f'task.num_train={len(train)}, and task.num_pairs={p} in the '
                      f'{len(train) - r} problems that are not RL prompts')
  rest = np.concatenate([train[:d], train[d + r:]])
  return StageProblems(train[:d], train[d:d + r], rest[:p])


def wrong_answer(c: int, rng: np.random.Generator) -> int:
  """A plausible error: off by 1 to 10, or one digit changed."""
  if rng.random() < 0.5:
    wrong = c + int(rng.choice([-10, -2, -1, 1, 2, 10]))
  else:
    digits = list(str(c))
    i = rng.integers(len(digits))
    digits[i] = str((int(digits[i]) + int(rng.integers(1, 10))) % 10)
    wrong = int(''.join(digits))
  return wrong if wrong != c and wrong >= 0 else c + 1


EQUATIONS = ('{a} + {b} = {c}', '{b} + {a} = {c}')
PROSE = ('The sum of {a} and {b} is {c}.', '{a} plus {b} makes {c}.',
         'Adding {a} and {b} gives {c}.')


def documents(pairs: np.ndarray, error_rate: float, lines_per_document: int, seed: int,
              passes: int, equation_share: float) -> list[str]:
  """Documents of sums: every problem stated `passes` times (a new order each pass), each time
  wrong with probability `error_rate`, drawn afresh, so the right sum is the one most statements
  agree on, as on the web (with one pass, the same 20% of the problems would be wrong in every
  epoch, and the model would learn them wrong); `equation_share` of the lines are equations
  (the few-shot prompt's format), the rest prose."""
  rng = np.random.default_rng(seed)
  lines = []
  for _ in range(passes):
    for a, b in pairs[rng.permutation(len(pairs))]:
      c = int(a + b)
      if rng.random() < error_rate:
        c = wrong_answer(c, rng)
      phrases = EQUATIONS if rng.random() < equation_share else PROSE
      lines.append(phrases[rng.integers(len(phrases))].format(a=a, b=b, c=c))
  return ['\n'.join(lines[i:i + lines_per_document]) + '\n'
          for i in range(0, len(lines), lines_per_document)]


def demonstrations(pairs: np.ndarray) -> list[dict]:
  return [{'prompt': question(a, b), 'response': str(a + b), 'answer': int(a + b)}
          for a, b in pairs]


def preference_pairs(pairs: np.ndarray, seed: int) -> list[dict]:
  rng = np.random.default_rng(seed)
  return [{'prompt': question(a, b), 'chosen': str(a + b),
           'rejected': str(wrong_answer(int(a + b), rng)), 'answer': int(a + b)}
          for a, b in pairs]


def write_jsonl(path: str, records: list[dict]) -> None:
  with open(path, 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in records)


def write_documents(directory: str, docs: list[str]) -> None:
  """The corpus as one text file per 1,000 documents (a TextCorpus directory)."""
  os.makedirs(directory, exist_ok=True)
  for i in range(0, len(docs), 1000):
    with open(os.path.join(directory, f'part{i // 1000:04d}.txt'), 'w') as f:
      f.write('\n'.join(docs[i:i + 1000]))


def exact_match(prompt: str, response: str, answer: int, **fields) -> float:
  """1 when the response is exactly the answer (surrounding spaces aside), else 0: the
  verifiable reward of RL on this task (`rl.reward=experiments.posttrain.task:exact_match`)."""
  del prompt, fields
  return float(response.strip() == str(answer))
