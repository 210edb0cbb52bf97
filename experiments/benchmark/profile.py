"""python -m experiments.benchmark.profile --workdir=DIR
    [--config=experiments/configs/profile_benchmark.py]

Where a compiled train call's time goes on the device, by XLA op kind: `jax.profiler.trace`
(with `create_perfetto_trace=True`) around `calls` calls after a warm-up call, then the trace's op
events summed by kind. On a CPU each thunk XLA runs is an event whose `hlo_op` names the
instruction (`dot.12`, `copy_bitcast_fusion.3`, `ynn_fusion`); its kind is the name without the
number. Only the innermost events count (a `while` loop's thunk holds its body's), and only the
program's own module. XLA's CPU thunks run about one at a time, so the kinds add up to a little
less than the wall time; the tracer's own overhead makes shares more trustworthy than
milliseconds.

Programs: a shape of the benchmark's catalog (the training loop's own call,
`experiments.benchmark.compiled_train_call`), or `grokking` (the grokking driver's scanned call
on experiments/configs/grokking_bench.py). Prints a table per program and writes
DIR/profile.json; the traces stay in DIR/trace/<program>/ (TensorBoard's profile plugin or
ui.perfetto.dev read them).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import time

from absl import flags

from train import cli


def op_kind(hlo_op: str) -> str:
  """'copy_bitcast_fusion.12' -> 'copy_bitcast_fusion'."""
  return re.sub(r'\.\d+$', '', hlo_op)


def innermost_op_events(events: list[dict]) -> list[dict]:
  """The op events (those naming an `hlo_op`) that contain no other op event of their thread."""
  ops = sorted((e for e in events if e.get('ph') == 'X' and 'hlo_op' in e.get('args', {})),
               key=lambda e: (e['tid'], e['ts']))
  leaves = []
  for e, after in zip(ops, ops[1:] + [None]):
    contains_next = (after is not None and after['tid'] == e['tid']
                     and after['ts'] < e['ts'] + e['dur'])
    if not contains_next:
      leaves.append(e)
  return leaves


def time_by_kind(trace_path: str) -> tuple[str, dict[str, dict]]:
  """(the module with the most op time, {kind: {'us': total microseconds, 'count': events}}) from
  a perfetto trace (.json.gz) of jax.profiler."""
  with gzip.open(trace_path) as f:
    events = json.load(f)['traceEvents']
  leaves = innermost_op_events(events)
  per_module = collections.Counter()
  for e in leaves:
    per_module[e['args'].get('hlo_module', '')] += e['dur']
  module = per_module.most_common(1)[0][0]
  kinds = collections.defaultdict(lambda: {'us': 0.0, 'count': 0})
  for e in leaves:
    if e['args'].get('hlo_module', '') == module:
      kinds[op_kind(e['args']['hlo_op'])]['us'] += e['dur']
      kinds[op_kind(e['args']['hlo_op'])]['count'] += 1
  return module, dict(kinds)


def program(name: str, config):
  """(call, steps per call): call() runs the program once and returns an array to wait on."""
  from model.config import ConfigError
  if name == 'grokking':
    import jax

    import experiments.grokking.__main__ as grokking
    from experiments.configs import grokking_bench
    gc = grokking_bench.get_config()
    setup = grokking.build(gc)
    train = jax.device_put(setup.task.train)
    steps = gc.train.steps_per_call
    scanned = grokking.make_call(setup.step, lambda params, tr, val: {}, eval_every=steps)
    state = setup.state

    def call():
      nonlocal state
      state, _ = scanned(state, train, train, 1)
      return state.step
    return call, steps
  if name not in config.catalog:
    raise ConfigError(f'config.programs: unknown program {name!r}; the catalog has '
                      f'{sorted(config.catalog)}, or grokking')
  from experiments.benchmark.__main__ import compiled_train_call
  call, _, _ = compiled_train_call(config.catalog[name], config.steps_per_call)
  return call, config.steps_per_call


def profile(name: str, config, trace_dir: str) -> dict:
  import jax
  call, steps = program(name, config)
  jax.block_until_ready(call())  # compiled and warm
  start = time.perf_counter()
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(config.calls):
      jax.block_until_ready(call())
  wall_s = time.perf_counter() - start
  trace = max(glob.glob(os.path.join(trace_dir, 'plugins', 'profile', '*',
                                     'perfetto_trace.json.gz')), key=os.path.getmtime)
  module, kinds = time_by_kind(trace)
  step_count = config.calls * steps
  total_us = sum(k['us'] for k in kinds.values())
  rows = [{'kind': kind, 'ms_per_step': k['us'] / 1e3 / step_count,
           'per_step': k['count'] / step_count, 'share': k['us'] / total_us}
          for kind, k in sorted(kinds.items(), key=lambda kv: -kv[1]['us'])]
  return {'program': name, 'module': module, 'steps': step_count, 'trace': trace,
          'wall_ms_per_step_traced': 1e3 * wall_s / step_count,
          'op_ms_per_step': total_us / 1e3 / step_count, 'kinds': rows}


def format_table(result: dict, top: int) -> str:
  rows = result['kinds']
  shown, rest = rows[:top], rows[top:]
  if rest:
    shown = shown + [{'kind': f'the rest ({len(rest)} kinds)',
                      'ms_per_step': sum(r['ms_per_step'] for r in rest),
                      'per_step': sum(r['per_step'] for r in rest),
                      'share': sum(r['share'] for r in rest)}]
  lines = [f'{result["program"]} ({result["module"]}): op events {result["op_ms_per_step"]:.2f} '
           f'ms a step of {result["wall_ms_per_step_traced"]:.2f} ms wall (traced), over '
           f'{result["steps"]} steps',
           f'{"op kind":<40}{"ms/step":>9}{"share":>8}{"ops/step":>10}']
  for r in shown:
    lines.append(f'{r["kind"]:<40}{r["ms_per_step"]:>9.2f}{100 * r["share"]:>7.1f}%'
                 f'{r["per_step"]:>10.1f}')
  return '\n'.join(lines)


def main(argv):
  del argv
  from train.perf import device_description
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  results = []
  for name in filter(None, config.programs.split(',')):
    result = profile(name, config, os.path.join(workdir, 'trace', name))
    results.append(result)
    print(format_table(result, config.top) + '\n')
  with open(os.path.join(workdir, 'profile.json'), 'w') as f:
    json.dump({'device': device_description(), 'load_average': os.getloadavg(),
               'programs': results}, f, indent=1)


if __name__ == '__main__':
  cli.command(main, 'Where profile.json and the traces are written.',
              config='profile_benchmark.py', makes='experiment')
