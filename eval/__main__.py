"""python -m eval --workdir=DIR [--step=N] [--config.train.eval_batch_size=...]
python -m eval --workdir=DIR --per_position [--seq_len=N] [--bucket=W]
    [--config.model.rope_scaling=yarn --config.model.rope_factor=8]

The validation metrics of a run's checkpoint (the latest by default) on the whole validation
split, those of its objective (train/objectives/: for a language model the loss in nats per
token, perplexity, bits per character and byte), printed and written to DIR/eval.json. --config is
the run's own config, whose values `--config.x.y=...` overrides.

With --per_position, the loss at each position of windows of --seq_len tokens (default: the
training length), at or beyond the length the run was trained at, uncropped (eval/loss.py);
printed in buckets of --bucket positions and written to DIR/eval_per_position.json. Overriding
model.rope_scaling and rope_factor evaluates a RoPE run stretched to a longer context
(rope_original_len defaults to the run's data.seq_len).
"""

import json
import os

import numpy as np

from absl import flags

from train import cli

flags.DEFINE_integer('step', None, 'Checkpoint step to evaluate (default: the latest).')
flags.DEFINE_bool('per_position', False, 'Report the validation loss by position instead.')
flags.DEFINE_integer('seq_len', None, 'With --per_position: the evaluation length (default: the '
                     'training length data.seq_len); longer reads past the trained context.')
flags.DEFINE_integer('bucket', None, 'With --per_position: positions per printed bucket (default: '
                     'seq_len / 16).')


def per_position(f) -> None:
  """The loss by position at --seq_len, printed in buckets and written to
  DIR/eval_per_position.json."""
  import jax

  from eval import loss as loss_lib
  from train.restore import load_run
  from model.config import ConfigError, ModelConfig
  config = f.config
  if not config:
    load_run(f.workdir)  # says there is no run there
  trained_len = config.data.seq_len
  seq_len = f.seq_len or trained_len
  if seq_len < 1 or (f.bucket is not None and f.bucket < 1):
    raise ConfigError(f'--seq_len and --bucket must be >= 1, got {seq_len} and {f.bucket}')
  if config.model.get('rope_scaling', 'none') != 'none' and not config.model.rope_original_len:
    config.model.rope_original_len = trained_len  # what YaRN's ramp reads
  model_section = dict(config.model.to_dict())  # checked before restoring anything
  loss_lib.check_length(ModelConfig.from_dict(dict(model_section, vocab_size=1)), seq_len)
  run = load_run(f.workdir, f.step, config)
  if run.objective.name != 'lm':
    raise ConfigError(f'--per_position reads a language-modelling run; {f.workdir} trained '
                      f'train.objective={run.objective.name}')
  data = run.objective.data(f.workdir, None)
  # As many tokens per batch as the run's evaluation batches hold.
  batch_size = max(1, config.train.eval_batch_size * trained_len // seq_len)
  loss_L, weight_L = loss_lib.loss_by_position(run.model, run.params, data.validation.tokens,
                                               seq_len, batch_size)
  width = f.bucket or max(1, seq_len // 16)
  rows = loss_lib.buckets(loss_L, weight_L, width)
  within = loss_lib.mean_over_prefixes(loss_L, weight_L, [min(trained_len, seq_len)])
  result = {'step': run.step, 'seq_len': seq_len, 'trained_len': trained_len,
            'position': run.model_cfg.position, 'rope_scaling': run.model_cfg.rope_scaling,
            'rope_factor': run.model_cfg.rope_factor,
            'val_loss': loss_lib.mean_over_prefixes(loss_L, weight_L, [seq_len])[seq_len],
            'val_loss_within_trained_len': next(iter(within.values())),
            'val_loss_beyond_trained_len': (
                float(np.sum(loss_L[trained_len:] * weight_L[trained_len:])
                      / np.sum(weight_L[trained_len:])) if seq_len > trained_len else None),
            'windows': int(weight_L[0]), 'buckets': rows,
            'loss_by_position': [float(x) for x in loss_L]}
  if jax.process_index() == 0:
    print(f'step {run.step}: loss by position at length {seq_len} (trained at {trained_len}), '
          f'{result["windows"]:,} windows; mean {result["val_loss"]:.4f}')
    for row in rows:
      mark = '  (beyond the trained length)' if row['start'] >= trained_len else ''
      print(f'  positions {row["start"]:>6}-{row["end"] - 1:<6} loss {row["loss"]:.4f}{mark}')
    with open(os.path.join(f.workdir, 'eval_per_position.json'), 'w') as out:
      json.dump(result, out, indent=1)


def main(argv):
  del argv
  import jax

  from train.restore import load_run
  from train.evaluate import compile_eval_step, evaluate
  f = flags.FLAGS
  if f.per_position:
    return per_position(f)
  run = load_run(f.workdir, f.step, f.config)
  data = run.objective.data(f.workdir, None)
  eval_step = compile_eval_step(run.eval_step(), run.objective.eval_spec(),
                                run.mesh, run.params, run.frozen)
  result = evaluate(eval_step, run.params, run.frozen, run.objective, data, run.mesh)
  result['step'] = run.step
  if jax.process_index() == 0:
    print(f'step {run.step}: ' + '  '.join(
        f'{k} {v:,}' if isinstance(v, int) else f'{k} {v:.4f}' for k, v in result.items()
        if k != 'step'))
    with open(os.path.join(f.workdir, 'eval.json'), 'w') as out:
      json.dump(result, out, indent=1)


if __name__ == '__main__':
  cli.command(main, 'Work directory of a training run.', config=cli.RUN_CONFIG)
