"""Grokking on modular arithmetic (Power et al. 2022; Nanda et al. 2023), in minutes on a CPU.

    python -m experiments.grokking --workdir=runs/grokking                        # default config
    python -m experiments.grokking --workdir=runs/nanda \
        --config=experiments/configs/grokking_nanda2023.py
    python -m experiments.grokking --workdir=runs/grokking_sweep --sweep          # fraction sweep

A one-layer transformer (`model.LM`) reads `a b =` and is trained, full batch, on part of the
table of a binary operation (arithmetic.py) with the answer token as the only target.
It memorises the training equations early and generalises to the held-out ones much later.

Writes into the work directory:
  metrics.jsonl   every `train.eval_every` steps: train/val loss and accuracy on the whole splits,
                  and the Gini coefficient of the embedding's Fourier spectrum (modular tasks)
  summary.json    memorize_step (first step with train accuracy >= 99%), grok_step (first with
                  validation accuracy >= 99%), final accuracies and losses, wall time, ms per step,
                  the embedding's key frequencies and their spectrum
  grokking.png    accuracy and loss against step (log axis), memorisation and grokking marked
  fourier.png     the final embedding's spectrum and its sparsity over training (modular tasks)
With --sweep, one such run per (train fraction, weight decay) of `config.sweep` in subdirectories,
then sweep.json and sweep.png: steps to generalise against the training fraction. Run again,
the sweep keeps each finished run whose config is unchanged (DIR/stages/) and trains the rest.

Why not `train/loop.py`: that loop streams token batches from a corpus and checkpoints; here the
whole dataset is a few thousand 3-token rows that live on the device, every step sees all of the
training split, evaluation is accuracy on the answer token, and a run is minutes long and stops
soon after it groks. So this driver reuses the train step (`train.step.make_train_step`, with the
answer-only loss `make_loss_fn(last_only=True)`), the state's initialisation
(`train.loop.init_state`), the optimizer (`train.optim.make_optimizer`, Grokfast as its gradient
filter) and the metrics writer, and keeps its own small loop. Each compiled call is a `lax.scan` of
`eval_every` steps followed by an evaluation, itself scanned `steps_per_call / eval_every` times,
with the splits passed in once and closed over: one dispatch per call, not per step.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Callable

import ml_collections
import numpy as np
from absl import flags

from train import cli

# JAX, the model and the task are imported in the functions that use them, as in the other
# experiments: `--help` answers without them.

SINGLE_DEVICE = {'data': 1, 'fsdp': 1, 'tensor': 1, 'expert': 1}
THRESHOLD = 0.99  # accuracy that counts as memorised (train) and generalised (validation)
OUTPUTS = ('metrics.jsonl', 'summary.json', 'grokking.png', 'fourier.png', 'tensorboard')


def first_step(rows: list[dict], key: str, threshold: float = THRESHOLD) -> int | None:
  """The first logged step at which rows[key] >= threshold, or None."""
  return next((r['step'] for r in rows if r[key] >= threshold), None)


def check_config(config) -> None:
  from experiments.grokking import arithmetic
  from model.config import ConfigError
  t = config.train
  arithmetic.check_task(config.task.operation, config.task.prime, config.task.train_fraction)
  if min(t.eval_every, t.steps_per_call, t.num_steps) <= 0 or (
      t.steps_per_call % t.eval_every or t.num_steps % t.eval_every):
    raise ConfigError(f'train.steps_per_call={t.steps_per_call} and train.num_steps='
                      f'{t.num_steps} must be positive multiples of train.eval_every='
                      f'{t.eval_every}: each compiled call ends on an evaluation')
  if config.grokfast.enabled and not (0.0 <= config.grokfast.alpha < 1.0
                                      and config.grokfast.lamb >= 0.0):
    raise ConfigError(f'grokfast.alpha must be in [0, 1) and grokfast.lamb >= 0, got '
                      f'{config.grokfast.alpha} and {config.grokfast.lamb}')


def accuracy(model, params, split):
  """(mean loss, accuracy) of the answers of a split, all rows at once."""
  import jax.numpy as jnp

  from train import step as step_lib
  logits_Bx1xV = model.apply({'params': params}, split['inputs'], last_only=True)
  correct = jnp.argmax(logits_Bx1xV, axis=-1) == split['targets']
  return (jnp.mean(step_lib.token_losses(logits_Bx1xV, split['targets'])),
          jnp.mean(correct.astype(jnp.float32)))


def make_call(step, evaluate, eval_every: int):
  """call(state, train_split, val_split, num_evals) -> (state, metrics): `num_evals` times,
  `eval_every` full-batch steps then evaluate(params, train_split, val_split), in one compiled
  program. The splits are arguments (not constants folded into the program) that every step
  closes over; metrics come back stacked, (num_evals,) each."""
  import jax
  def call(state, train_split, val_split, num_evals):
    def steps_then_eval(state, _):
      state, _ = jax.lax.scan(lambda s, _: step(s, train_split), state, None, length=eval_every)
      return state, evaluate(state.params, train_split, val_split)
    return jax.lax.scan(steps_then_eval, state, None, length=num_evals)

  return jax.jit(call, static_argnums=3, donate_argnums=0)


@dataclasses.dataclass
class Setup:
  """What a run is built from: the task's splits, the model, the step and evaluation functions
  (pure, to be compiled together by `make_call`) and the initial train state."""
  task: 'experiments.grokking.arithmetic.Task'
  model_cfg: 'model.ModelConfig'
  model: 'model.LM'
  step: Callable
  evaluate: Callable
  state: 'train.step.TrainState'


def build(config) -> Setup:
  import jax
  import jax.numpy as jnp

  from experiments.grokking import arithmetic, fourier
  from model import LM, ModelConfig
  from train import optim, step as step_lib
  from train.grokfast import grokfast_ema
  from train.loop import init_state
  from train.mesh import make_mesh
  check_config(config)
  tc = config.train
  task = arithmetic.load(config.task)
  model_cfg = ModelConfig.from_dict(dict(config.model.to_dict(), vocab_size=task.vocab_size))
  model = LM(model_cfg)
  gradient_filter = (grokfast_ema(config.grokfast.alpha, config.grokfast.lamb)
                     if config.grokfast.enabled else None)
  optimizer = optim.make_optimizer(tc, gradient_filter)
  step = step_lib.make_train_step(model, optimizer, optim.learning_rate_schedule(tc), tc.seed,
                                  loss_fn=step_lib.make_loss_fn(model, False, last_only=True))
  modular = config.task.operation in arithmetic.MODULAR
  basis_PxP = jnp.asarray(fourier.basis(task.num_elements)) if modular else None

  def evaluate(params, train_split, val_split):
    metrics = dict(zip(('train_loss', 'train_accuracy'), accuracy(model, params, train_split)))
    metrics.update(zip(('val_loss', 'val_accuracy'), accuracy(model, params, val_split)))
    if modular:
      embedding_PxD = params['token_embedding'][:task.num_elements]  # without '='
      metrics['embedding_fourier_gini'] = fourier.sparsity(embedding_PxD, basis_PxP)
    return metrics

  state, _ = init_state(model, optimizer, make_mesh(SINGLE_DEVICE, jax.devices()[:1]), tc.seed)
  return Setup(task, model_cfg, model, step, evaluate, state)


def clear_outputs(workdir: str) -> None:
  """A run starts afresh: an earlier run's outputs in its work directory are removed."""
  os.makedirs(workdir, exist_ok=True)
  for name in OUTPUTS:
    path = os.path.join(workdir, name)
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif os.path.exists(path):
      os.remove(path)


def train(config, workdir: str) -> dict:
  """One run: trains until it generalises (then on to `train.stop_after_grok` x that step) or
  for num_steps, and writes metrics.jsonl, summary.json and the plots. Returns the summary."""
  import jax

  from experiments.grokking import arithmetic, fourier, plots
  from model import count_params
  from train.metric_writer import MetricWriter
  from train.progress import Progress
  from train.workdir import EXPERIMENT, save_config
  start = time.time()
  tc = config.train
  setup = build(config)
  task, state = setup.task, setup.state
  clear_outputs(workdir)
  save_config(config, workdir, kind=EXPERIMENT)  # a grokking run: not one `eval` reads
  train_split, val_split = jax.device_put(task.train), jax.device_put(task.validation)
  call = make_call(setup.step, setup.evaluate, tc.eval_every)

  writer = MetricWriter(workdir)
  progress = Progress(tc.num_steps)
  progress.write(
      f'{config.task.operation} with {task.num_elements} elements: '
      f'{len(task.train["inputs"]):,} training and {len(task.validation["inputs"]):,} validation '
      f'equations; {count_params(setup.model_cfg).total:,} parameters; {workdir}')
  compiled = {}  # num_evals -> executable, compiled ahead so compile time is counted apart
  rows, done, grok_step = [], 0, None
  compile_s = train_s = 0.0
  while done < tc.num_steps:
    num_evals = min(tc.steps_per_call, tc.num_steps - done) // tc.eval_every
    if num_evals not in compiled:
      compile_start = time.time()
      compiled[num_evals] = call.lower(state, train_split, val_split, num_evals).compile()
      compile_s += time.time() - compile_start
    call_start = time.time()
    state, metrics = compiled[num_evals](state, train_split, val_split)
    metrics = jax.device_get(metrics)
    train_s += time.time() - call_start
    for i in range(num_evals):
      rows.append({'step': done + (i + 1) * tc.eval_every,
                   **{k: float(v[i]) for k, v in metrics.items()}})
      writer.write(rows[-1]['step'], {k: v for k, v in rows[-1].items() if k != 'step'})
    done, last = rows[-1]['step'], rows[-1]
    progress.update(done, train_acc=last['train_accuracy'], val_acc=last['val_accuracy'],
                    train_loss=last['train_loss'], val_loss=last['val_loss'])
    if not np.isfinite(last['train_loss']):
      progress.write(f'the training loss became {last["train_loss"]} by step {done}; stopping')
      break
    grok_step = first_step(rows, 'val_accuracy')
    if grok_step is not None and done >= tc.stop_after_grok * grok_step:
      break
  writer.close()
  progress.close()

  summary = {
      'memorize_step': first_step(rows, 'train_accuracy'),
      'grok_step': grok_step,
      'final_step': done,
      'final_train_accuracy': last['train_accuracy'],
      'final_val_accuracy': last['val_accuracy'],
      'final_train_loss': last['train_loss'],
      'final_val_loss': last['val_loss'],
      'wall_s': None,  # set once the plots are written
      'compile_s': compile_s,
      'ms_per_step': 1000 * train_s / done,  # evaluations included
      'operation': config.task.operation,
      'prime': config.task.prime if config.task.operation in arithmetic.MODULAR else None,
      'train_fraction': config.task.train_fraction,
      'weight_decay': tc.weight_decay,
      'grokfast': bool(config.grokfast.enabled),
  }
  if 'embedding_fourier_gini' in last:
    embedding_PxD = np.asarray(state.params['token_embedding'][:task.num_elements])
    spectrum = fourier.spectrum(embedding_PxD, fourier.basis(task.num_elements))
    keys = fourier.key_frequencies(spectrum)
    summary.update(key_frequencies=keys,
                   key_frequency_share=float(sum(spectrum[k - 1] for k in keys)),
                   embedding_fourier_gini=last['embedding_fourier_gini'],
                   fourier_spectrum=[float(x) for x in spectrum])
    plots.plot_fourier(spectrum, keys, rows, summary,
                                os.path.join(workdir, 'fourier.png'))
  plots.plot_curves(rows, summary, os.path.join(workdir, 'grokking.png'))
  summary['wall_s'] = time.time() - start
  with open(os.path.join(workdir, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  print(f'done: memorize_step {summary["memorize_step"]}, grok_step {summary["grok_step"]}, '
        f'val accuracy {summary["final_val_accuracy"]:.4f} at step {done}, '
        f'wall {summary["wall_s"]:.1f}s ({summary["ms_per_step"]:.1f} ms/step, '
        f'compile {compile_s:.1f}s)')
  return summary


SWEEP_FIELDS = ('train_fraction', 'weight_decay', 'memorize_step', 'grok_step', 'final_step',
                'final_val_accuracy', 'wall_s')


def sweep(config, workdir: str) -> list[dict]:
  """One run per (weight decay, train fraction) of config.sweep, in workdir/wd<w>_frac<f>/;
  then sweep.json and sweep.png. Each run is a stage (experiments/stages.py): run again, the
  command keeps the runs whose config is unchanged and makes the others again."""
  from experiments import stages
  from experiments.grokking import plots
  results = []
  for weight_decay in config.sweep.weight_decays:
    for fraction in config.sweep.train_fractions:
      c = ml_collections.ConfigDict(config.to_dict())
      c.task.train_fraction, c.train.weight_decay = float(fraction), float(weight_decay)
      name = f'wd{weight_decay:g}_frac{fraction:g}'

      def make(path, c=c):
        summary = train(c, path)
        return {k: summary[k] for k in SWEEP_FIELDS}

      settings = {k: v for k, v in c.to_dict().items() if k != 'sweep'}  # the run's own
      stage = stages.Stage(workdir, name, settings, [os.path.join(workdir, name)])
      results.append(stages.run(stage, make)['result'])
  with open(os.path.join(workdir, 'sweep.json'), 'w') as f:
    json.dump(results, f, indent=1)
  plots.plot_sweep(results, config.train.num_steps, os.path.join(workdir, 'sweep.png'))
  return results


def main(argv):
  del argv
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  if flags.FLAGS.sweep:
    sweep(config, workdir)
  else:
    train(config, workdir)


def define_flags() -> None:
  """The command line's flags; defined only when run as a command, so that importing this module
  (tests, notebooks) leaves absl's global flags alone."""
  flags.DEFINE_bool('sweep', False, 'Sweep config.sweep.train_fractions x weight_decays instead '
                    'of one run, and plot steps to generalise against the training fraction.')


if __name__ == '__main__':
  define_flags()
  cli.command(main, 'Work directory: metrics, summary and plots.', config='grokking.py',
              makes='experiment')
