"""Post-training, from a document completer to an assistant, on a task whose answers can be
checked (integer addition, experiments/posttrain/task.py):

    python -m experiments.posttrain --workdir=runs/posttrain [--config=...posttrain.py]

  base    pretrains a small LM on documents of sums written as equations and prose, some wrong
  sft     teaches the chat format on demonstrations (from base)
  reward  a reward model on pairs, the right answer against a wrong one (from sft)
  dpo     DPO on pairs sampled from the SFT model and labelled by correctness (from sft)
  grpo    GRPO with the exact-match reward, on held-out training questions (from sft)
  rlhf    PPO against the reward model's score, the KL penalty in the reward (from sft)

Each stage is a normal training run in DIR/<stage>/ (`python -m train`'s loop with that stage's
objective, `train.init_from` the stage before it), resumable. Re-running skips a stage, or a file
in DIR/data, only when it was made from the same config and the same earlier stages
(experiments/stages.py; records in DIR/stages/), and makes the others again.
Every model is measured by held-out exact-match accuracy on the test problems, greedy: the base
model zero-shot in the chat template and few-shot in its own format (`a + b = c` lines), the
others in the chat template; the reward model by its pairwise accuracy on held-out pairs. Writes
DIR/summary.json ({"accuracy": {stage: ...}, "reward_model_accuracy": ..., "rl": {stage: first
and last reward, accuracy and KL}}), DIR/accuracy.png and DIR/rl_curves.png (reward, exact-match
accuracy of the rollouts and KL to the reference over the RL steps).
"""

from __future__ import annotations

import json
import os
import time

import ml_collections
import numpy as np
from absl import flags

from train import cli

STAGES = ('base', 'sft', 'reward', 'dpo', 'grpo', 'rlhf')
RUN_SECTIONS = ('model', 'data', 'train', 'mesh', 'chat', 'lora', 'reward', 'dpo', 'rl')
RL_STAGES = ('grpo', 'rlhf')


def stage_config(config, stage: str, data_path: str, init_from: str = '',
                 objective: str = 'lm', rl: dict | None = None) -> ml_collections.ConfigDict:
  """A stage's training config: the run sections with the stage's train.* settings and rl.*
  settings (the stage's `rl`, then `rl`)."""
  c = ml_collections.ConfigDict({k: config[k].to_dict() for k in RUN_SECTIONS})
  settings = config.stages[stage].to_dict()
  c.rl.update(settings.pop('rl', {}), **(rl or {}))
  c.train.update(settings)
  c.train.update(objective=objective, init_from=init_from)
  c.data.path = data_path
  return c


def train_stage(config, workdir: str, stage: str, after=(), **kwargs) -> dict:
  """Trains the stage in DIR/<stage> unless it finished before from the same config and the
  same records `after` (the stages it starts from and its data); its record
  (experiments/stages.py). A stale run is trained afresh; an interrupted one resumes."""
  from experiments import stages
  from train.loop import train_and_evaluate
  from train.progress import say
  c = stage_config(config, stage, **kwargs)

  def train(run_dir):
    say(f'{stage}: training ({c.train.objective}, {c.train.num_steps} steps) in {run_dir}')
    return train_and_evaluate(c, run_dir)

  return stages.run(stages.Stage(workdir, stage, c.to_dict(), [run_dir_of(workdir, stage)],
                                 after), train, in_place=True)


def run_dir_of(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage)


def timed(times: dict, stage: str, fn, *args, **kwargs):
  """fn(*args, **kwargs), its wall time added to times[stage]."""
  start = time.time()
  out = fn(*args, **kwargs)
  times[stage] = times.get(stage, 0.0) + time.time() - start
  return out


def train_stages(config, workdir: str, problems, times: dict) -> dict[str, dict]:
  """Every training stage's record, each trained unless done (experiments/stages.py), after the
  files it reads: the task's files in DIR/data, then base, sft, reward, DPO's pairs and dpo,
  grpo and rlhf. `times` gains each stage's wall time."""
  from experiments.posttrain import task
  split = task.stage_problems(problems.train, config.task)  # checked before anything is written
  made = data_stages(config, workdir, problems, split)
  data = {name: os.path.join(workdir, 'data', name) for name in made}
  sft_dir = run_dir_of(workdir, 'sft')
  runs = {}
  runs['base'] = timed(times, 'base', train_stage, config, workdir, 'base',
                       after=[made['corpus']], data_path=data['corpus'])
  runs['sft'] = timed(times, 'sft', train_stage, config, workdir, 'sft',
                      after=[made['sft.jsonl'], runs['base']], data_path=data['sft.jsonl'],
                      init_from=run_dir_of(workdir, 'base'), objective='sft')
  runs['reward'] = timed(times, 'reward', train_stage, config, workdir, 'reward',
                         after=[made['reward.jsonl'], runs['sft']],
                         data_path=data['reward.jsonl'], init_from=sft_dir, objective='reward')
  pairs = timed(times, 'dpo', sampled_pairs, workdir, runs['sft'], config, problems)
  runs['dpo'] = timed(times, 'dpo', train_stage, config, workdir, 'dpo',
                      after=[pairs, runs['sft']], data_path=pairs_path(workdir),
                      init_from=sft_dir, objective='dpo')
  runs['grpo'] = timed(times, 'grpo', train_stage, config, workdir, 'grpo',
                       after=[made['rl.jsonl'], runs['sft']], data_path=data['rl.jsonl'],
                       init_from=sft_dir, objective='grpo')
  runs['rlhf'] = timed(times, 'rlhf', train_stage, config, workdir, 'rlhf',
                       after=[made['rl.jsonl'], runs['sft'], runs['reward']],
                       data_path=data['rl.jsonl'], init_from=sft_dir, objective='ppo',
                       rl={'reward_model': run_dir_of(workdir, 'reward')})
  return runs


def exact_match(run, prompts: list[np.ndarray], answers: list[int], config, what: str,
                eos_id: int) -> tuple[float, list[str]]:
  """(share of prompts answered exactly, the answers) with greedy generation."""
  from eval.respond import respond
  outs = respond(run.model, run.params, prompts, max_new_tokens=config.eval.max_new_tokens,
                 eos_id=eos_id, batch_size=config.eval.batch_size, what=what)
  texts = [run.tokenizer.decode(o).strip() for o in outs]
  return float(np.mean([t == str(a) for t, a in zip(texts, answers)])), texts


def few_shot_prompt(tokenizer, examples: np.ndarray, a: int, b: int) -> np.ndarray:
  from experiments.posttrain import task
  lines = [f'{task.equation(x, y)} {x + y}' for x, y in examples]
  return tokenizer.encode('\n'.join(lines + [task.equation(a, b)]))


def accuracies(workdir: str, stage: str, run: dict, config, problems) -> dict:
  """The stage's exact-match accuracy on the test problems (chat and, for the base, few-shot),
  kept in DIR/<stage>/accuracy.json while the run (its record `run`) and the evaluation settings
  stay the same."""
  from experiments import stages
  path = os.path.join(run_dir_of(workdir, stage), 'accuracy.json')
  settings = {'eval': config.eval.to_dict(), 'task': task_settings(config)}
  stages.run(stages.Stage(workdir, f'{stage}_accuracy', settings, [path], [run]),
             lambda out: measure_accuracies(run_dir_of(workdir, stage), config, problems,
                                            stage != 'base', out))
  with open(path) as f:
    return json.load(f)


def measure_accuracies(run_dir: str, config, problems, chat: bool, path: str) -> None:
  """Writes the run's accuracies to `path`."""
  from eval.respond import chat_prompt
  from train.restore import load_run
  from experiments.posttrain import task
  from train.chat import ChatTemplate
  run = load_run(run_dir)
  template = run.template or ChatTemplate.from_config(config.chat)  # the base has none
  eos = int(run.tokenizer.encode(template.end_of_turn)[0])
  answers = [int(a + b) for a, b in problems.test]
  chat_prompts = [chat_prompt(run.tokenizer, template, task.question(a, b))
                  for a, b in problems.test]
  result = {}
  result['chat'], samples = exact_match(run, chat_prompts, answers, config,
                                        f'answering {len(answers)} test questions', eos)
  result['chat_samples'] = samples[:10]
  if not chat:
    shots = problems.train[:config.eval.few_shot]
    prompts = [few_shot_prompt(run.tokenizer, shots, a, b) for a, b in problems.test]
    newline = int(run.tokenizer.encode('\n')[0])
    result['few_shot'], samples = exact_match(run, prompts, answers, config,
                                              'answering few-shot', newline)
    result['few_shot_samples'] = samples[:10]
  with open(path, 'w') as f:
    json.dump(result, f, indent=1)


def reward_model_accuracy(run_dir: str, config, problems) -> float:
  """The reward model's pairwise accuracy on pairs of the test problems (right vs wrong)."""
  from train.restore import load_run
  from experiments.posttrain import task
  from train.evaluate import compile_eval_step, evaluate
  from train.objectives.base import Data
  run = load_run(run_dir)
  records = [dict(r, prompt=[{'role': 'user', 'content': r['prompt']}],
                  chosen=[{'role': 'user', 'content': r['prompt']},
                          {'role': 'assistant', 'content': r['chosen']}],
                  rejected=[{'role': 'user', 'content': r['prompt']},
                            {'role': 'assistant', 'content': r['rejected']}])
             for r in task.preference_pairs(problems.test, config.task.seed + 1)]
  examples = run.objective.encode(run.tokenizer, run.template, records, 'test')
  step = compile_eval_step(run.eval_step(), run.objective.eval_spec(),
                           run.mesh, run.params, run.frozen)
  metrics = evaluate(step, run.params, run.frozen, run.objective,
                     Data(run.tokenizer, None, examples), run.mesh)
  return float(metrics['val_accuracy'])


def sampled_pairs(workdir: str, sft: dict, config, problems) -> dict:
  """DPO's pairs, DIR/data/dpo.jsonl, sampled from the SFT model (its record `sft`): made again
  when SFT or the sampling settings change; the stage's record."""
  from experiments import stages
  settings = {'sampling': config.sampling.to_dict(), 'task': task_settings(config),
              'max_new_tokens': config.eval.max_new_tokens}
  return stages.run(stages.Stage(workdir, 'dpo_pairs', settings,
                                 [pairs_path(workdir)], [sft]),
                    lambda path: sample_pairs(run_dir_of(workdir, 'sft'), config, problems, path))


def sample_pairs(sft_dir: str, config, problems, path: str) -> None:
  """samples_per_prompt answers of the SFT model to training questions, at the sampling
  temperature; a prompt with a right and a wrong answer gives one pair, a line of `path`."""
  from model.decode import Sampling
  from eval.respond import chat_prompt, respond
  from train.restore import load_run
  from experiments.posttrain import task
  from train.data import DataError
  from train.progress import say
  s = config.sampling
  run = load_run(sft_dir)
  eos = int(run.tokenizer.encode(run.template.end_of_turn)[0])
  chosen = problems.train[np.random.default_rng(config.task.seed).permutation(
      len(problems.train))[:s.num_prompts]]
  prompts = [chat_prompt(run.tokenizer, run.template, task.question(a, b))
             for a, b in chosen for _ in range(s.samples_per_prompt)]
  outs = respond(run.model, run.params, prompts, max_new_tokens=config.eval.max_new_tokens,
                 sampling=Sampling(s.temperature), eos_id=eos, seed=config.task.seed,
                 batch_size=config.eval.batch_size, what='sampling the SFT model')
  texts = [run.tokenizer.decode(o).strip() for o in outs]
  pairs = []
  for i, (a, b) in enumerate(chosen):
    answers = texts[i * s.samples_per_prompt:(i + 1) * s.samples_per_prompt]
    right = [t for t in answers if t == str(a + b)]
    wrong = [t for t in answers if t != str(a + b)]
    if right and wrong:
      pairs.append({'prompt': task.question(a, b), 'chosen': right[0], 'rejected': wrong[0],
                    'answer': int(a + b)})
  right = np.mean([t == str(a + b) for t, (a, b) in
                   zip(texts, np.repeat(chosen, s.samples_per_prompt, axis=0))])
  say(f'dpo: {len(pairs)} pairs from {len(chosen)} prompts ({right:.1%} of the samples right)')
  if not pairs:  # refused here, where the fix is known, rather than by DPO's empty data
    raise DataError(f'dpo: no prompt of sampling.num_prompts={s.num_prompts} got both a right '
                    f'and a wrong answer from the SFT model ({right:.1%} right); train SFT '
                    'longer (stages.sft.num_steps) or raise sampling.samples_per_prompt')
  task.write_jsonl(path, pairs)


def pairs_path(workdir: str) -> str:
  return os.path.join(workdir, 'data', 'dpo.jsonl')


def task_settings(config) -> dict:
  """The task section less where TFDS keeps its files: what the problems are made from."""
  return {k: v for k, v in config.task.to_dict().items() if k != 'tfds_data_dir'}


def data_stages(config, workdir: str, problems, split) -> dict:
  """The task's files in DIR/data, each a stage made from the task section: the base corpus,
  SFT's demonstrations, the reward model's pairs, the RL prompts. Their records by name."""
  from experiments import stages
  from experiments.posttrain import task
  t = config.task
  makers = {
      'corpus': lambda out: task.write_documents(out, task.documents(
          problems.train, t.error_rate, t.lines_per_document, t.seed, t.passes,
          t.equation_share)),
      'sft.jsonl': lambda out: task.write_jsonl(out, task.demonstrations(split.demonstrations)),
      'reward.jsonl': lambda out: task.write_jsonl(out, task.preference_pairs(split.pairs,
                                                                               t.seed)),
      # RL prompts: training questions that neither SFT's demonstrations nor the reward model's
      # pairs used, with their answers for the exact-match reward.
      'rl.jsonl': lambda out: task.write_jsonl(out, [
          {'prompt': task.question(a, b), 'answer': int(a + b)} for a, b in split.rl])}
  records = {}
  for name, make in makers.items():
    stage = stages.Stage(workdir, f'data_{name.split(".")[0]}', task_settings(config),
                         [os.path.join(workdir, 'data', name)])
    records[name] = stages.run(stage, make)
  return records


def rl_curves(run_dir: str) -> dict:
  """An RL stage's per-step reward, rollout accuracy and KL (from DIR/<stage>/metrics.jsonl)."""
  curves = {'step': [], 'reward': [], 'accuracy': [], 'kl': []}
  with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
    for row in map(json.loads, f):
      if 'reward' in row:
        for key, field in (('step', 'step'), ('reward', 'reward'), ('accuracy', 'accuracy'),
                           ('kl', 'train_kl')):
          curves[key].append(row.get(field, float('nan')))
  return curves


def rl_ends(curves: dict) -> dict:
  """The mean reward, rollout accuracy and KL over the first and the last fifth of the logged
  steps (one step's rollout is noisy)."""
  out = {}
  for key in ('reward', 'accuracy', 'kl'):
    values = np.asarray([v for v in curves[key] if np.isfinite(v)])
    fifth = max(1, len(values) // 5)
    out[f'{key}_first'] = float(values[:fifth].mean()) if len(values) else None
    out[f'{key}_last'] = float(values[-fifth:].mean()) if len(values) else None
  return out


def plot_rl(curves: dict, path: str) -> None:
  """Reward (each stage's own: exact match, the reward model's score), rollout accuracy and KL
  over the RL steps; thin lines per step, thick a moving average over 5 logged steps."""
  from eval.figures import plt, save
  panels = [(stage, 'reward', f'{stage}: reward ({what})') for stage, what in
            (('grpo', 'exact match'), ('rlhf', "the reward model's score")) if stage in curves]
  panels += [(None, 'accuracy', 'exact-match accuracy of the rollouts'),
             (None, 'kl', 'KL to the reference')]
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
  colors = {stage: f'C{i}' for i, stage in enumerate(curves)}
  for ax, (only, key, title) in zip(axes, panels):
    for stage, c in curves.items():
      if only not in (None, stage):
        continue
      # The KL is a train metric, logged every train.log_every steps; rewards every step.
      points = np.asarray([(x, y) for x, y in zip(c['step'], c[key]) if np.isfinite(y)])
      if not len(points):
        continue
      ax.plot(points[:, 0], points[:, 1], color=colors[stage], alpha=0.3, lw=0.8)
      window = min(5, len(points))
      smooth = np.convolve(points[:, 1], np.ones(window) / window, mode='valid')
      ax.plot(points[window - 1:, 0], smooth, color=colors[stage], lw=2, label=stage)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel('RL step')
    ax.grid(alpha=0.3)
    if only is None:
      ax.legend(fontsize=8)
  save(fig, path, dpi=110)


def plot(summary: dict, path: str) -> None:
  from eval.figures import plt, save
  names = list(summary['accuracy'])
  values = [100 * summary['accuracy'][n] for n in names]
  fig, ax = plt.subplots(figsize=(7, 4))
  bars = ax.bar(names, values, color=[f'C{i}' for i in range(len(names))])
  for b, v in zip(bars, values):
    ax.text(b.get_x() + b.get_width() / 2, v + 1, f'{v:.1f}%', ha='center', fontsize=9)
  ax.set_ylabel('held-out exact-match accuracy (%)')
  ax.set_ylim(0, 105)
  ax.set_title(f'integer addition, {summary["num_test"]} test problems; reward model pairwise '
               f'accuracy {100 * summary["reward_model_accuracy"]:.1f}%', fontsize=9)
  ax.grid(axis='y', alpha=0.3)
  save(fig, path, dpi=110)


def main(argv):
  del argv
  from experiments.posttrain import task
  from train.progress import say
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  start = time.time()
  problems = task.load(config.task)
  times = {}
  runs = train_stages(config, workdir, problems, times)
  results = {stage: timed(times, f'{stage}_eval', accuracies, workdir, stage, runs[stage],
                          config, problems) for stage in ('base', 'sft', 'dpo', *RL_STAGES)}
  curves = {stage: rl_curves(run_dir_of(workdir, stage)) for stage in RL_STAGES}
  summary = {
      'accuracy': {'base': results['base']['chat'],
                   'base_few_shot': results['base']['few_shot'],
                   **{stage: results[stage]['chat'] for stage in ('sft', 'dpo', *RL_STAGES)}},
      'reward_model_accuracy': timed(times, 'reward_eval', reward_model_accuracy,
                                     run_dir_of(workdir, 'reward'), config, problems),
      'num_test': len(problems.test),
      'rl': {stage: rl_ends(c) for stage, c in curves.items()},
      'rl_curves': {stage: {k: [v if np.isfinite(v) else None for v in values]
                            for k, values in c.items()} for stage, c in curves.items()},
      'samples': {stage: r for stage, r in results.items()},
      'stage_wall_s': times, 'wall_s': time.time() - start}
  with open(os.path.join(workdir, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  plot(summary, os.path.join(workdir, 'accuracy.png'))
  plot_rl(curves, os.path.join(workdir, 'rl_curves.png'))
  say('accuracy: ' + ', '.join(f'{k} {100 * v:.1f}%' for k, v in summary['accuracy'].items())
      + f'; reward model {100 * summary["reward_model_accuracy"]:.1f}%; '
      f'{summary["wall_s"]:.0f} s')


if __name__ == '__main__':
  cli.command(main, 'Work directory: data/, one run per stage, summary.json.',
              config='posttrain.py', makes='experiment')
