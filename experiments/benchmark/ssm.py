"""python -m experiments.benchmark.ssm --workdir=DIR [--config=experiments/configs/ssm_benchmark.py]

Forward+backward time of one block of each of `config.mixers` (Mamba, Mamba-2 and attention by
default) at the same width as the sequence length doubles: a recurrent block's time grows
linearly, attention's quadratically.

Each block is `model.blocks.Block` with no feed-forward (pre-norm, mixer, residual), built from
`config.model`. Times are medians of `train.perf.timed` over jitted gradients with respect to the
parameters and the input. Prints a table, writes DIR/ssm_benchmark.json and DIR/ssm_benchmark.png,
and says at which length each recurrent mixer's line crosses attention's (see `crossing`).
"""

from __future__ import annotations

import json
import math
import os

from absl import flags

from train import cli



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
  # mamba_s: the times of any recurrent mixer; the notes say "Mamba" for it.
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
  from eval.figures import plt, save

  lengths = [r['length'] for r in result['rows']]
  fig, (ax_time, ax_token) = plt.subplots(1, 2, figsize=(11, 4.2))
  for mixer, style in zip(result['mixers'], ('o-', 's-', '^-', 'v-', 'D-')):
    seconds = [r[f'{mixer}_s'] for r in result['rows']]
    label = f'{mixer} (slope {result["log_slopes"][mixer]:.2f} at the end)'
    ax_time.loglog(lengths, seconds, style, base=2, label=label)
    ax_token.semilogx(lengths, [1e6 * s / (result['batch'] * l)
                                for s, l in zip(seconds, lengths)], style, base=2, label=mixer)
  for mixer, cross in result['crossing'].items():
    if cross['note'].startswith('interpolated'):
      for ax in (ax_time, ax_token):
        ax.axvline(cross['length'], color='grey', ls=':', label=f'{mixer} = attn')
  ax_time.set(xlabel='sequence length L', ylabel='forward+backward time (s)',
              title=f'one block, D={result["d_model"]}, batch {result["batch"]}')
  ax_token.set(xlabel='sequence length L', ylabel='time per token (µs)',
               title='per token: flat is linear, rising is quadratic')
  for ax in (ax_time, ax_token):
    ax.grid(True, which='both', alpha=0.3)
    ax.legend()
  fig.suptitle(result['device'], fontsize=9)
  save(fig, path, dpi=120)


def main(argv):
  del argv
  from model.config import ConfigError, ModelConfig
  from train.perf import device_description, timed

  c, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  lengths = sorted(c.lengths)
  mixers = list(c.mixers)
  if not lengths or lengths[0] < 1:
    raise ConfigError(f'config.lengths={c.lengths}: give positive sequence lengths')
  cfg = ModelConfig.from_dict(dict(c.model.to_dict(), pattern=','.join(mixers),
                                   max_len=max(c.model.max_len, lengths[-1])))
  os.makedirs(workdir, exist_ok=True)
  print(f'{device_description()}: one block (no feed-forward) of width {cfg.d_model}, '
        f'batch {c.batch}, forward+backward, median of {c.repeats}')
  print(f'{"L":>6} ' + ' '.join(f'{m + " ms":>10}' for m in mixers)
        + ' ' + ' '.join(f'{m + " µs/tok":>13}' for m in mixers))
  rows = []
  for length in lengths:
    row = {'length': length}
    for mixer in mixers:
      fn, args = block_gradient(cfg, mixer, c.batch, length)
      row[f'{mixer}_s'] = timed(fn, *args, repeats=c.repeats)
      del fn, args  # free attention's L x L buffers before the next measurement
    rows.append(row)
    tokens = c.batch * length
    print(f'{length:>6} ' + ' '.join(f'{1e3 * row[m + "_s"]:>10.2f}' for m in mixers) + ' '
          + ' '.join(f'{1e6 * row[m + "_s"] / tokens:>13.2f}' for m in mixers), flush=True)

  result = dict(device=device_description(), d_model=cfg.d_model, num_heads=cfg.num_heads,
                batch=c.batch, repeats=c.repeats, mixers=mixers, model=cfg.to_dict(),
                rows=rows, crossing={})
  times = {m: [r[f'{m}_s'] for r in rows] for m in mixers}
  notes = []
  if 'attn' in mixers:
    for mixer in mixers:
      if mixer == 'attn':
        continue
      cross = result['crossing'][mixer] = crossing(lengths, times[mixer], times['attn'])
      notes.append(f'{mixer} and attention do not cross: {cross["note"]}' if cross['length'] is None
                   else f'{mixer} and attention cross at L ~ {cross["length"]:.0f} '
                        f'({cross["note"]})')
  if len(rows) > 1:
    result['log_slopes'] = {m: log_slope(lengths, times[m]) for m in mixers}
    notes.append('over the last doubling the time grew as '
                 + ', '.join(f'L^{result["log_slopes"][m]:.2f} ({m})' for m in mixers))
  result['summary'] = '; '.join(notes)
  print(result['summary'])
  with open(os.path.join(workdir, 'ssm_benchmark.json'), 'w') as f:
    json.dump(result, f, indent=1)
  if len(rows) > 1:
    plot(result, os.path.join(workdir, 'ssm_benchmark.png'))
  print(f'wrote {workdir}/ssm_benchmark.json and ssm_benchmark.png')


if __name__ == '__main__':
  cli.command(main, 'Directory for ssm_benchmark.json and ssm_benchmark.png.',
              config='ssm_benchmark.py', makes='experiment')
