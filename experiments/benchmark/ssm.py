"""Forward+backward time of one Mamba block and one attention block of the same width as the
sequence length doubles: the Mamba block's time grows linearly, attention's quadratically.

    python -m experiments.ssm_benchmark --workdir=runs/ssm_benchmark

Each block is `model.blocks.Block` with no feed-forward (pre-norm, mixer, residual), at the model's
defaults (Mamba: N = 16, Din = 2 D, conv 4, parallel scan in chunks of 128; attention: RoPE, causal,
`jax.nn.dot_product_attention`). Times are medians of `train.perf.timed` over jitted gradients with
respect to the parameters and the input. Prints a table, writes DIR/ssm_benchmark.json and
DIR/ssm_benchmark.png, and says at which length the lines cross (see `crossing`).
"""

from __future__ import annotations

import json
import math
import os

from absl import app, flags

from train import cli

flags.DEFINE_string('workdir', None, 'Directory for ssm_benchmark.json and ssm_benchmark.png.')
flags.DEFINE_integer('d_model', 256, 'Width D of both blocks.')
flags.DEFINE_integer('num_heads', 4, 'Attention heads (head width D / heads).')
flags.DEFINE_integer('batch', 1, 'Sequences per call: attention at 8192 tokens holds a few '
                     '(batch, heads, L, L) float32 arrays, 1 GiB each for batch 1 and 4 heads.')
flags.DEFINE_integer('min_len', 256, 'Shortest sequence length.')
flags.DEFINE_integer('max_len', 8192, 'Longest sequence length (lengths double from min_len).')
flags.DEFINE_integer('repeats', 3, 'Timed calls per measurement (after one warm-up call).')
flags.mark_flag_as_required('workdir')

MIXERS = ('mamba', 'attn')


def block_gradient(cfg, mixer: str, batch: int, length: int):
  """A jitted gradient of one block with respect to its parameters and input, and its args."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from model.blocks import Block

  block = Block(cfg, mixer=mixer, ffn='none')
  kx, kp = jax.random.split(jax.random.key(length))
  x_BxLxD = jax.random.normal(kx, (batch, length, cfg.d_model), jnp.float32)
  positions_BxL = jnp.broadcast_to(jnp.arange(length), (batch, length))
  params = nn.unbox(jax.jit(block.init)(kp, x_BxLxD, positions_BxL))['params']

  def loss(params, x_BxLxD):
    y_BxLxD, _ = block.apply({'params': params}, x_BxLxD, positions_BxL)
    return jnp.mean(y_BxLxD.astype(jnp.float32) ** 2)

  return jax.jit(jax.grad(loss, argnums=(0, 1))), (params, x_BxLxD)


def crossing(lengths, mamba_s, attn_s) -> dict:
  """The length from which attention is slower than Mamba: log(attn time / mamba time) is
  interpolated linearly in log(length) between the measured lengths around its sign change, or
  extrapolated from the last two lengths when Mamba is slower throughout; None when there is no
  such length (attention slower from the start, or a gap that does not close)."""
  x = [math.log(l) for l in lengths]
  gap = [math.log(a / m) for m, a in zip(mamba_s, attn_s)]   # > 0: attention is slower
  if gap[0] > 0:
    return dict(length=None, note='attention is slower at every measured length')
  for i in range(1, len(lengths)):
    if gap[i] > 0:
      f = gap[i - 1] / (gap[i - 1] - gap[i])
      return dict(length=math.exp(x[i - 1] + f * (x[i] - x[i - 1])),
                  note=f'interpolated between L={lengths[i - 1]} and L={lengths[i]}')
  slope = (gap[-1] - gap[-2]) / (x[-1] - x[-2]) if len(lengths) > 1 else 0.0
  if slope <= 0:
    return dict(length=None, note='Mamba is slower at every measured length and the gap '
                                  'does not close')
  return dict(length=math.exp(x[-1] - gap[-1] / slope),
              note='extrapolated from the last two lengths: Mamba is slower at every measured '
                   'length')


def log_slope(lengths, seconds) -> float:
  """d log(time) / d log(length) over the last two lengths: 1 linear, 2 quadratic."""
  return math.log(seconds[-1] / seconds[-2]) / math.log(lengths[-1] / lengths[-2])


def plot(result: dict, path: str):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  lengths = [r['length'] for r in result['rows']]
  fig, (ax_time, ax_token) = plt.subplots(1, 2, figsize=(11, 4.2))
  for mixer, style in zip(MIXERS, ('o-', 's-')):
    seconds = [r[f'{mixer}_s'] for r in result['rows']]
    label = f'{mixer} (slope {result["log_slopes"][mixer]:.2f} at the end)'
    ax_time.loglog(lengths, seconds, style, base=2, label=label)
    ax_token.semilogx(lengths, [1e6 * s / (result['batch'] * l)
                                              for s, l in zip(seconds, lengths)],
                      style, base=2, label=mixer)
  if result['crossing']['note'].startswith('interpolated'):
    for ax in (ax_time, ax_token):
      ax.axvline(result['crossing']['length'], color='grey', ls=':', label='crossing')
  ax_time.set(xlabel='sequence length L', ylabel='forward+backward time (s)',
              title=f'one block, D={result["d_model"]}, batch {result["batch"]}')
  ax_token.set(xlabel='sequence length L', ylabel='time per token (µs)',
               title='per token: flat is linear, rising is quadratic')
  for ax in (ax_time, ax_token):
    ax.grid(True, which='both', alpha=0.3)
    ax.legend()
  fig.suptitle(result['device'], fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from model.config import ModelConfig
  from train.perf import device_description, timed

  FLAGS = flags.FLAGS
  if not 0 < FLAGS.min_len <= FLAGS.max_len:
    raise app.UsageError(f'need 0 < --min_len <= --max_len, got {FLAGS.min_len}, {FLAGS.max_len}')
  os.makedirs(FLAGS.workdir, exist_ok=True)
  cfg = ModelConfig(d_model=FLAGS.d_model, num_heads=FLAGS.num_heads, pattern='mamba,attn',
                    max_len=FLAGS.max_len)
  lengths = []
  while FLAGS.min_len * 2 ** len(lengths) <= FLAGS.max_len:
    lengths.append(FLAGS.min_len * 2 ** len(lengths))

  print(f'{device_description()}: one block (no feed-forward) of width {cfg.d_model}, '
        f'batch {FLAGS.batch}, forward+backward, median of {FLAGS.repeats}')
  print(f'{"L":>6} {"mamba ms":>10} {"attn ms":>10} {"attn/mamba":>11} '
        f'{"mamba µs/tok":>13} {"attn µs/tok":>12}')
  rows = []
  for length in lengths:
    row = {'length': length}
    for mixer in MIXERS:
      fn, args = block_gradient(cfg, mixer, FLAGS.batch, length)
      row[f'{mixer}_s'] = timed(fn, *args, repeats=FLAGS.repeats)
      del fn, args  # free attention's L x L buffers before the next measurement
    rows.append(row)
    tokens = FLAGS.batch * length
    print(f'{length:>6} {1e3 * row["mamba_s"]:>10.2f} {1e3 * row["attn_s"]:>10.2f} '
          f'{row["attn_s"] / row["mamba_s"]:>11.2f} {1e6 * row["mamba_s"] / tokens:>13.2f} '
          f'{1e6 * row["attn_s"] / tokens:>12.2f}', flush=True)

  mamba_s = [r['mamba_s'] for r in rows]
  attn_s = [r['attn_s'] for r in rows]
  cross = crossing(lengths, mamba_s, attn_s)
  result = dict(device=device_description(), d_model=cfg.d_model, num_heads=cfg.num_heads,
                batch=FLAGS.batch, repeats=FLAGS.repeats, mamba=cfg.to_dict()['mamba'],
                rows=rows, crossing=cross)
  if cross['length'] is None:
    summary = f'the lines do not cross: {cross["note"]}'
  else:
    summary = f'the lines cross at L ~ {cross["length"]:.0f} ({cross["note"]})'
  if len(rows) > 1:
    result['log_slopes'] = {'mamba': log_slope(lengths, mamba_s),
                            'attn': log_slope(lengths, attn_s)}
    summary += (f'; over the last doubling Mamba\'s time grew as '
                f'L^{result["log_slopes"]["mamba"]:.2f}, attention\'s as '
                f'L^{result["log_slopes"]["attn"]:.2f}')
  result['summary'] = summary
  print(summary)
  with open(os.path.join(FLAGS.workdir, 'ssm_benchmark.json'), 'w') as f:
    json.dump(result, f, indent=1)
  if len(rows) > 1:
    plot(result, os.path.join(FLAGS.workdir, 'ssm_benchmark.png'))
  print(f'wrote {FLAGS.workdir}/ssm_benchmark.json and ssm_benchmark.png')


if __name__ == '__main__':
  cli.run(main)
