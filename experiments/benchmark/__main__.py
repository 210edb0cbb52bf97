"""python -m experiments.benchmark --workdir=DIR [--config=experiments/configs/benchmark.py]

Measures, on whatever device JAX has: the peak matmul rate of the device in each compute dtype
(the denominator of MFU), then for each model shape the training throughput (tokens/s), model
FLOPs utilisation, step time, compile time and peak memory, and decoding tokens/s with and without
the KV cache at a few context lengths. Prints a table and writes DIR/benchmark.json.

Timing practice: compile time is measured separately (`lower().compile()`); each figure is the
median of `repeats` calls after a warm-up call (`train.perf.timed`), with device work synchronised
before the clock is read. A train call is the training loop's own compiled call, built
by the loop's builder (`train.loop.train_call`): `steps_per_call` steps as one `lax.scan`.

The package's other commands: `python -m experiments.benchmark.moe` (an MoE against the dense
model of its active size, trained), `python -m experiments.benchmark.ssm` (Mamba against
attention as the length grows), `python -m experiments.benchmark.pytorch` (nanogpt_cpu against
nanoGPT in PyTorch, interleaved; `torch_gpt` is the PyTorch side alone),
`python -m experiments.benchmark.profile` (where a train call's time goes, from a
`jax.profiler` trace), `python -m experiments.benchmark.loader` (the loop's wait for
batches) and `python -m experiments.benchmark.variants` (one-off variants of a computation, each
in two forms that compute the same thing).
"""

from __future__ import annotations

import json
import os
import time

import ml_collections
import numpy as np
from absl import flags

from train import cli
from train.progress import say



def _train_config(shape) -> ml_collections.ConfigDict:
  from experiments.configs import base
  tc = base.get_config().train
  tc.update(batch_size=shape.batch_size, num_steps=10_000, warmup_steps=100)
  return tc


def peak_memory_bytes(compiled) -> int:
  """The device's own high-water mark where it keeps one (GPUs, TPUs); otherwise what XLA's
  buffer assignment of the compiled program needs (CPU)."""
  import jax
  stats = jax.devices()[0].memory_stats()
  if stats and 'peak_bytes_in_use' in stats:
    return int(stats['peak_bytes_in_use'])
  return int(compiled.memory_analysis().peak_memory_in_bytes)


def compiled_train_call(shape, steps_per_call: int):
  """The training loop's own compiled call (`train.loop.train_call`: `steps_per_call` steps as
  one `lax.scan`) at `shape`, on random tokens: (call, compiled, compile_s), where call() runs it
  once, threading the state it donates, and returns the loss."""
  from model import LM, ModelConfig
  from train import mesh as mesh_lib, optim
  from train.loop import init_state, train_call

  cfg = ModelConfig.from_dict(shape.model)
  tc = _train_config(shape)
  model = LM(cfg)
  optimizer = optim.make_optimizer(tc)
  mesh = mesh_lib.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1, 'expert': 1})
  state, shardings = init_state(model, optimizer, mesh, seed=0, num_steps=tc.num_steps)
  steps_sharding = mesh_lib.batch_sharding(mesh, leading_axes=1)
  multi = train_call(model, optimizer, tc, mesh, shardings)  # the training loop's own call
  tokens = np.random.default_rng(0).integers(
      0, cfg.vocab_size, (steps_per_call, shape.batch_size, shape.seq_len + 1), dtype=np.int32)
  batches = mesh_lib.put_batch({'inputs': tokens[..., :-1], 'targets': tokens[..., 1:]},
                               steps_sharding)

  start = time.perf_counter()
  compiled = multi.lower(state, batches).compile()
  compile_s = time.perf_counter() - start

  def call():
    nonlocal state
    state, metrics = compiled(state, batches)
    return metrics['loss']

  return call, compiled, compile_s


def bench_train(name: str, shape, steps_per_call: int, repeats: int, peak: float) -> dict:
  from model import ModelConfig, training_flops_per_token
  from train import perf

  cfg = ModelConfig.from_dict(shape.model)
  call, compiled, compile_s = compiled_train_call(shape, steps_per_call)
  step_s = perf.timed(call, repeats=repeats) / steps_per_call
  tokens_per_s = shape.batch_size * shape.seq_len / step_s
  flops = training_flops_per_token(cfg, shape.seq_len)
  return {'name': name, 'dtype': cfg.dtype, 'batch_size': shape.batch_size,
          'seq_len': shape.seq_len, 'tokens_per_s': tokens_per_s,
          'mfu': flops * tokens_per_s / peak, 'step_ms': 1e3 * step_s, 'compile_s': compile_s,
          'peak_memory_bytes': peak_memory_bytes(compiled), 'flops_per_token': flops}


def bench_decode(name: str, shape, context: int, repeats: int) -> dict:
  """Tokens/s of generating `decode_new_tokens` greedy tokens after a prompt of context - new
  tokens, so that the last token sees `context` positions: new tokens over the wall time of the
  whole compiled `generate` call, the prompt's prefill included (what a user waits for). The
  uncached baseline recomputes the full forward pass for every token."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from model.decode import Sampling, generate, generate_uncached
  from model import LM, ModelConfig
  from train.perf import timed

  cfg = ModelConfig.from_dict(shape.model)
  model = LM(cfg)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  new = shape.decode_new_tokens
  prompt = jax.random.randint(jax.random.key(1), (1, context - new), 0, cfg.vocab_size)
  rates = {}
  for label, fn in (('cached', generate), ('uncached', generate_uncached)):
    seconds = timed(lambda p: fn(model, p, prompt, jax.random.key(2), max_new_tokens=new,
                                 sampling=Sampling(0.0))[0], params['params'], repeats=repeats)
    rates[label] = new / seconds
  return {'name': name, 'context': context, 'new_tokens': new,
          'cached_tokens_per_s': rates['cached'], 'uncached_tokens_per_s': rates['uncached'],
          'speedup': rates['cached'] / rates['uncached']}


def main(argv):
  del argv
  import jax

  from model.config import ConfigError
  from train import perf
  c = flags.FLAGS.config
  workdir = flags.FLAGS.workdir
  platform = jax.devices()[0].platform
  names = [n for n in (c.shapes or (c.cpu if platform == 'cpu' else c.accelerator)).split(',')
           if n]
  unknown = [n for n in names if n not in c.catalog]
  if unknown:
    raise ConfigError(f'config.shapes: unknown shape(s) {unknown}; the catalog has '
                      f'{sorted(c.catalog)}')
  for name in names:
    if c.catalog[name].model.attention_impl == 'cudnn' and platform != 'gpu':
      raise ConfigError(f'shape {name} uses cuDNN attention, which needs an NVIDIA GPU; on '
                        f'{platform} add --config.catalog.{name}.model.attention_impl=xla')
  os.makedirs(workdir, exist_ok=True)

  dtypes = sorted({c.catalog[n].model.dtype for n in names})
  peaks = {d: perf.peak_flops_per_s(d) for d in dtypes}
  result = {'device': perf.device_description(),
            'peak_flops_per_s': peaks[dtypes[0]] if len(dtypes) == 1 else peaks,
            'train': [], 'decode': []}
  for name in names:
    shape = c.catalog[name]
    row = bench_train(name, shape, c.steps_per_call, c.repeats, peaks[shape.model.dtype])
    result['train'].append(row)
    say(f'train {name}: {row["tokens_per_s"]:,.0f} tokens/s, MFU {100 * row["mfu"]:.1f}%, '
        f'{row["step_ms"]:.2f} ms/step')
    for context in shape.decode_contexts if c.decode else ():
      row = bench_decode(name, shape, context, c.repeats)
      result['decode'].append(row)
      say(f'decode {name} @ {context}: cached {row["cached_tokens_per_s"]:,.0f} tokens/s, '
          f'uncached {row["uncached_tokens_per_s"]:,.0f} ({row["speedup"]:.1f}x)')

  print(format_table(result))
  with open(os.path.join(workdir, 'benchmark.json'), 'w') as f:
    json.dump(result, f, indent=1)


def format_table(result: dict) -> str:
  peaks = result['peak_flops_per_s']
  peaks = peaks if isinstance(peaks, dict) else {'': peaks}
  lines = [f'device: {result["device"]}',
           'peak matmul (train.perf.peak): ' + ', '.join(f'{d} {p / 1e12:.3f} TFLOP/s'.strip()
                                               for d, p in peaks.items()), '',
           f'{"train":<14}{"dtype":>10}{"tokens/s":>12}{"MFU":>8}{"step ms":>10}'
           f'{"compile s":>11}{"peak MiB":>10}']
  for r in result['train']:
    lines.append(f'{r["name"]:<14}{r["dtype"]:>10}{r["tokens_per_s"]:>12,.0f}'
                 f'{100 * r["mfu"]:>7.1f}%{r["step_ms"]:>10.2f}{r["compile_s"]:>11.1f}'
                 f'{r["peak_memory_bytes"] / 2**20:>10.1f}')
  if result['decode']:
    lines += ['', f'{"decode":<14}{"context":>8}{"cached tok/s":>14}{"uncached tok/s":>16}'
                  f'{"speedup":>9}']
    for r in result['decode']:
      lines.append(f'{r["name"]:<14}{r["context"]:>8}{r["cached_tokens_per_s"]:>14,.0f}'
                   f'{r["uncached_tokens_per_s"]:>16,.0f}{r["speedup"]:>8.1f}x')
  return '\n'.join(lines)


if __name__ == '__main__':
  cli.command(main, 'Where benchmark.json is written.', config='benchmark.py',
              makes='experiment')
