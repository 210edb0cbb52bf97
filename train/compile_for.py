"""A run compiled for a TPU slice ahead of time, on a machine without one, and whether it fits:

  python -m train --config=... --workdir=DIR --compile_for=v5p:2x2x2

libtpu describes the devices of any slice (`jax.experimental.topologies`) and JAX compiles for
them with the TPU compiler itself. The mesh is built from those devices by the same `config.mesh`
rules as a run's, and the programs are a run's own: `train.loop.train_call` (the multi-step
train call of train.steps_per_call steps), `train.evaluate.sharded_eval_step` and
`model.decode.generate` (what `python -m eval.sample` runs at its defaults, one sample up to the
training context). Nothing runs
and no data is read: the vocabulary is model.vocab_size. Per chip, printed and written to
DIR/compile.json (beside the compiled programs' HLO text, DIR/<program>.hlo.txt):

- memory of each program against the HBM the compiler may use: arguments, outputs, temporaries
  (the compiler's peak of live buffers less arguments and fresh outputs) and generated code; the
  eval step adds the optimizer state, which stays in HBM while it runs. A program that cannot fit
  fails to compile with RESOURCE_EXHAUSTED: that is reported as not fitting, with the compiler's
  numbers.
- FLOPs of a train step in the compiled program's matmuls (train/hlo.py, loops counted) beside
  the model's own count, `model.training_flops_per_token` x tokens.
- an estimate, not a measurement, of step time and MFU: every instruction at the chip's
  published peak FLOP/s or HBM bandwidth, whichever bounds it (`hlo.ProgramStats.
  roofline_seconds`). Collectives and vector work are left out, so real steps are slower.
- the collectives of a train step: how many, how often they run, and their bytes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import time

import jax
import jax.numpy as jnp
import ml_collections

from model import LM, ConfigError, ModelConfig, count_params, training_flops_per_token
from model.config import check_context
from model.decode import Sampling, generate
from train import hlo, loop, optim, workdir as workdir_lib
from train.evaluate import sharded_eval_step
from train.perf import CHIPS, Chip, GiB
from train.objectives.lm import LanguageModeling
from train import mesh as mesh_lib

REPORT_FILE = 'compile.json'
PROGRAMS = ('train', 'eval', 'decode')


class TopologyError(ValueError):
  """A --compile_for topology that libtpu cannot describe (or libtpu missing)."""


# ---------------------------------------------------------------------------------------------
# The slice.


# libtpu, loaded where no TPU is attached, logs errors while reading this host's place in a
# slice from placeholders, and lets one process at a time load it (/tmp/libtpu_lockfile). Telling
# it the host is one of its own silences the errors and leaves the topology it describes the same
# (devices, hosts and coordinates); the lock guards TPU chips, of which none are used here.
_NO_TPU_ENVIRONMENT = {'TPU_WORKER_HOSTNAMES': 'localhost', 'TPU_HOST_BOUNDS': '1,1,1',
                       'ALLOW_MULTIPLE_LIBTPU_LOAD': '1'}


@contextlib.contextmanager
def _libtpu_without_tpu():
  """libtpu's environment while it loads, where JAX found no TPU attached; as it was after."""
  if 'tpu' in (jax.config.jax_platforms or '').split(','):  # a TPU VM: leave it as it is
    yield
    return
  added = [k for k in _NO_TPU_ENVIRONMENT if k not in os.environ]
  os.environ.update({k: _NO_TPU_ENVIRONMENT[k] for k in added})
  try:
    yield
  finally:
    for key in added:
      os.environ.pop(key, None)


def topology_devices(topology: str) -> list:
  """The devices of the slice `topology` names in chips, GENERATION:AxB[xC] (v5e:4x4,
  v5p:2x2x2), one device per chip as a run on that slice sees them."""
  try:
    import libtpu  # noqa: F401  (the TPU compiler)
  except ImportError:
    raise TopologyError("--compile_for needs libtpu, the TPU compiler: pip install -e '.[tpu]'"
                        ) from None
  from jax.experimental import topologies
  generation, _, shape = topology.partition(':')
  dims = shape.split('x')
  if not generation or not all(d.isdigit() and int(d) > 0 for d in dims):
    raise TopologyError(f'--compile_for={topology!r}: write GENERATION:AxB[xC] in chips, e.g. '
                        f'v5e:2x2, v5e:4x4, v5p:2x2x2, v4:2x2x1, v6e:4x4')
  bounds = [int(d) for d in dims] + [1] * (3 - len(dims))
  options = dict(
      # libtpu's hosts hold 2x2x1 chips; a smaller slice is one host.
      chips_per_host_bounds=tuple(min(b, h) for b, h in zip(bounds, (2, 2, 1))),
      # v4 and v5p chips have two TensorCores, which JAX drives as one device ('megacore').
      **({'chip_config_name': 'megacore'} if generation in ('v4', 'v5p') else {}))
  try:
    with _libtpu_without_tpu():
      devices = topologies.get_topology_desc(topology, 'tpu', **options).devices
  except jax.errors.JaxRuntimeError as e:
    raise TopologyError(f'--compile_for={topology}: libtpu does not know this topology: '
                        f'{str(e).splitlines()[0]}') from None
  if devices[0].device_kind not in CHIPS:
    raise TopologyError(f'--compile_for={topology}: no published figures here for '
                        f'{devices[0].device_kind}; the chips known are '
                        f'{", ".join(c.name for c in CHIPS.values())}')
  return devices


# ---------------------------------------------------------------------------------------------
# Compiling the programs.


def _memory(compiled, resident: float, chip: Chip) -> dict:
  m = compiled.memory_analysis()
  fresh_outputs = m.output_size_in_bytes - m.alias_size_in_bytes
  total = m.peak_memory_in_bytes + m.generated_code_size_in_bytes + resident
  return dict(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes,
              aliased=m.alias_size_in_bytes,
              temporaries=max(m.peak_memory_in_bytes - m.argument_size_in_bytes - fresh_outputs, 0),
              generated_code=m.generated_code_size_in_bytes, resident=resident,
              peak=m.peak_memory_in_bytes, total=total, hbm=chip.hbm_bytes,
              fits=total <= chip.hbm_bytes,
              # XLA's own temporaries figure: on TPU it leaves out buffers live across loops.
              xla_temp_size=m.temp_size_in_bytes)


_EXHAUSTED = re.compile(r'required for .*?\(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)')


def _compile(name: str, lower, resident: float, chip: Chip,
             hlo_dir: str | None = None) -> dict:
  """The report of one program, compiled or, where it does not fit, refused by the compiler.
  With `hlo_dir`, the compiled program's HLO text goes to HLO_DIR/<name>.hlo.txt."""
  start = time.perf_counter()
  try:
    compiled = lower().compile()
  except jax.errors.JaxRuntimeError as e:
    if 'RESOURCE_EXHAUSTED' not in str(e):
      raise
    message = str(e).splitlines()[0]
    numbers = _EXHAUSTED.search(message)
    memory = dict(fits=False, error=message, resident=resident, hbm=chip.hbm_bytes,
                  total=float(numbers.group(1)) * GiB + resident if numbers else None)
    if numbers:
      memory['hbm'] = float(numbers.group(2)) * GiB
    return dict(name=name, compile_s=time.perf_counter() - start, memory=memory)
  report = dict(name=name, compile_s=time.perf_counter() - start,
                memory=_memory(compiled, resident, chip))
  text = compiled.as_text()
  if hlo_dir:
    with open(os.path.join(hlo_dir, f'{name}.hlo.txt'), 'w') as f:
      f.write(text)
  stats = hlo.analyze(text)
  report.update(matmul_flops=stats.matmul_flops, hbm_bytes=stats.hbm_bytes,
                collectives={k: v for k, v in stats.collectives.items() if v['ops']},
                unknown_loops=stats.unknown_loops,
                # XLA's own count, for comparison: it counts each loop body once.
                xla_cost_analysis_flops=float((compiled.cost_analysis() or {}).get('flops', 0)))
  report['roofline_s'], report['memory_bound_s'] = stats.roofline_seconds(chip.peak_flops,
                                                                          chip.hbm_bandwidth)
  return report


def _per_chip_bytes(tree) -> float:
  return float(sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                   for x in jax.tree.leaves(tree)))


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
  """The run's ModelConfig from the config alone: the vocabulary must be given."""
  if not config.model.vocab_size:
    raise ConfigError('--compile_for reads no data, so it cannot take the tokenizer\'s '
                      'vocabulary (model.vocab_size=0): set --config.model.vocab_size')
  model_cfg = ModelConfig.from_dict(config.model.to_dict())
  if model_cfg.attention_impl == 'cudnn':
    raise ConfigError('model.attention_impl=cudnn runs on NVIDIA GPUs only; for a TPU set '
                      '--config.model.attention_impl=xla')
  check_context(model_cfg, config.data.seq_len, 'data.seq_len')
  return model_cfg


def compile_run(config: ml_collections.ConfigDict, topology: str,
                programs: tuple[str, ...] = PROGRAMS, hlo_dir: str | None = None) -> dict:
  """Compiles the run `config` describes for the slice `topology`; returns the report. With
  `hlo_dir`, each compiled program's HLO text is written there (<program>.hlo.txt)."""
  devices = topology_devices(topology)
  chip = CHIPS[devices[0].device_kind]
  tc, dc = config.train, config.data
  model_cfg = model_config(config)
  try:
    mesh = mesh_lib.make_mesh(config.mesh, devices=devices)
  except mesh_lib.MeshError as e:
    raise mesh_lib.MeshError(f'{topology} has {len(devices)} chips: {e}') from None
  loop.check_batches(tc, mesh)
  model = LM(model_cfg)
  optimizer = optim.make_optimizer(tc)
  state = loop.abstract_state(model, optimizer, mesh)  # refuses a mesh the parameters do not fit
  shardings = jax.tree.map(lambda x: x.sharding, state)
  objective = LanguageModeling(config)
  multi_step = loop.train_call(model, optimizer, tc, mesh, shardings, objective.loss_fn)
  eval_step = sharded_eval_step(objective, model, mesh, shardings.params, shardings.frozen)
  steps, L = tc.steps_per_call, dc.seq_len
  counts = count_params(model_cfg)
  report = dict(topology=topology, chip=dataclasses.asdict(chip), chips=len(devices),
                hosts=len({d.process_index for d in devices}), mesh=dict(mesh.shape),
                libtpu=_libtpu_version(), parameters=counts.total,
                flops_per_token=training_flops_per_token(model_cfg, L),
                batch_size=tc.batch_size, seq_len=L, steps_per_call=steps, programs={})

  # Batches as the loop puts them: (steps, B, L) for a train call, (B, L) with weights for eval.
  train_batch = {k: jax.ShapeDtypeStruct((steps, tc.batch_size, L), jnp.int32,
                                         sharding=mesh_lib.batch_sharding(mesh, leading_axes=1))
                 for k in ('inputs', 'targets')}
  eval_batch = {k: jax.ShapeDtypeStruct((tc.eval_batch_size, L), dtype,
                                        sharding=mesh_lib.batch_sharding(mesh))
                for k, dtype in (('inputs', jnp.int32), ('targets', jnp.int32),
                                 ('weights', jnp.float32))}
  lowerings = {  # (lower, bytes that stay in HBM beside the program)
      'train': (lambda: multi_step.lower(state, train_batch), 0.0),
      'eval': (lambda: eval_step.lower(state.params, state.frozen, eval_batch),
               _per_chip_bytes(state.opt_state)),
      'decode': (lambda: _lower_decode(model, state.params, mesh, L), 0.0),
  }
  for name in programs:
    lower, resident = lowerings[name]
    report['programs'][name] = _compile(name, lower, resident, chip, hlo_dir)
  if 'train' in programs:
    report['estimate'] = _estimate(report, chip)
  return report


def _lower_decode(model: LM, params, mesh, context: int):
  """`model.decode.generate` as `python -m eval.sample` runs it by default: one sample from a
  one-token prompt, to the end of the training context, temperature 0.8."""
  replicated = mesh_lib.replicated(mesh)
  prompt = jax.ShapeDtypeStruct((1, 1), jnp.int32, sharding=replicated)
  key = jax.eval_shape(lambda: jax.random.key(0))
  key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated)
  return generate.lower(model, params, prompt, key, max_new_tokens=context - 1,
                        sampling=Sampling(temperature=0.8))


def _estimate(report: dict, chip: Chip) -> dict | None:
  """The train step's time, throughput and MFU if it ran at the roofline estimate."""
  train = report['programs']['train']
  if 'roofline_s' not in train:
    return None
  steps, chips = report['steps_per_call'], report['chips']
  tokens = report['batch_size'] * report['seq_len']
  step_s = train['roofline_s'] / steps
  model_flops = report['flops_per_token'] * tokens
  return dict(step_s=step_s, memory_bound_fraction=train['memory_bound_s'] / train['roofline_s'],
              tokens_per_s=tokens / step_s,
              mfu=model_flops / (chips * chip.peak_flops * step_s),
              compiled_flops_per_step=train['matmul_flops'] / steps,
              model_flops_per_step=model_flops / chips)


def _libtpu_version() -> str:
  import importlib.metadata
  return importlib.metadata.version('libtpu')


# ---------------------------------------------------------------------------------------------
# The report.


def _flops(x: float) -> str:
  for scale, prefix in ((1e15, 'P'), (1e12, 'T'), (1e9, 'G'), (1e6, 'M')):
    if x >= scale:
      return f'{x / scale:#.3g}'.rstrip('.') + f' {prefix}FLOP'
  return f'{x:.3g} FLOP'


def _memory_row(label: str, m: dict, unit: float) -> str:
  size = lambda x: f'{x / unit:.2f}'
  if 'error' in m:
    total = size(m['total']) if m['total'] else '?'
    over = f', {(m["total"] - m["hbm"]) / GiB:.2f} GiB over' if m['total'] else ''
    return (f'{label:<30}{"the compiler ran out of HBM":>48}{total:>9}{m["hbm"] / GiB:>9.2f}'
            f'  NO{over}')
  verdict = (f'yes, {100 * m["total"] / m["hbm"]:.1f}% of HBM' if m['fits'] else
             f'NO, {(m["total"] - m["hbm"]) / GiB:.2f} GiB over')
  return (f'{label:<30}{size(m["arguments"]):>10}{size(m["outputs"]):>9}'
          f'{size(m["temporaries"]):>13}{size(m["generated_code"]):>7}{size(m["resident"]):>9}'
          f'{size(m["total"]):>9}{m["hbm"] / GiB:>9.2f}  {verdict}')


def format_report(report: dict) -> str:
  chip = report['chip']
  programs = report['programs']
  totals = [p['memory']['total'] or 0 for p in programs.values()]
  unit, unit_name = (GiB, 'GiB') if max(totals, default=0) >= GiB else (2 ** 20, 'MiB')
  lines = [
      f'compiled for {report["topology"]} (libtpu {report["libtpu"]}): {report["chips"]} '
      f'{chip["name"]} chip{"s" if report["chips"] > 1 else ""} in {report["hosts"]} '
      f'host{"s" if report["hosts"] > 1 else ""}, '
      f'mesh {" x ".join(f"{k}={v}" for k, v in report["mesh"].items())}',
      f'model: {report["parameters"] / 1e6:,.1f}M parameters, '
      f'{_flops(report["flops_per_token"])}s per token; train step '
      f'{report["batch_size"]} x {report["seq_len"]} tokens, {report["steps_per_call"]} steps '
      f'per call', '',
      f'{"memory per chip, " + unit_name:<30}{"arguments":>10}{"outputs":>9}{"temporaries":>13}'
      f'{"code":>7}{"resident":>9}{"total":>9}{"HBM GiB":>9}  fits']
  labels = {'train': f'train ({report["steps_per_call"]} steps a call)',
            'eval': 'eval step', 'decode': f'decode (1 x {report["seq_len"]} tokens)'}
  for name, p in programs.items():
    lines.append(_memory_row(labels[name], p['memory'], unit))
  estimate = report.get('estimate')
  if estimate:
    compiled, model = estimate['compiled_flops_per_step'], estimate['model_flops_per_step']
    lines += [
        '', f'train step, per chip: {_flops(compiled)} in the compiled program\'s matmuls; the '
        f'model\'s count (model.training_flops_per_token x tokens) is {_flops(model)} '
        f'({compiled / model:.2f}x)',
        f'estimate, not a measurement (each instruction at {chip["name"]}\'s '
        f'{chip["peak_flops"] / 1e12:.0f} TFLOP/s or {chip["hbm_bandwidth"] / 1e9:.0f} GB/s, '
        f'whichever bounds it; collectives and vector work left out, so a real step is slower): '
        f'{estimate["step_s"] * 1e3:.3g} ms per step '
        f'({100 * estimate["memory_bound_fraction"]:.0f}% of it memory-bound), '
        f'{estimate["tokens_per_s"] / report["chips"]:,.0f} tokens/s per chip, '
        f'MFU {100 * estimate["mfu"]:.0f}%']
  train = programs.get('train', {})
  if 'collectives' in train:
    steps = report['steps_per_call']
    found = [f'{kind} {c["ops"]} in the program, {c["runs"] / steps:,.0f} a step, '
             f'{c["bytes"] / steps / 2**20:,.1f} MiB' for kind, c in train['collectives'].items()]
    lines.append('collectives per train step per chip: ' + ('; '.join(found) or 'none'))
  if train.get('unknown_loops'):
    lines.append(f'note: {train["unknown_loops"]} loop(s) of the train step have a trip count '
                 f'the analysis cannot read; they are counted once')
  return '\n'.join(lines)


def compile_for(config: ml_collections.ConfigDict, workdir: str, topology: str) -> dict:
  """`python -m train --compile_for=TOPOLOGY`: compiles, prints the report, writes
  DIR/compile.json and the compiled programs, DIR/<program>.hlo.txt."""
  with workdir_lib.undone_on_failure(workdir):  # a refusal leaves no half-written directory
    os.makedirs(workdir, exist_ok=True)
    report = compile_run(config, topology, hlo_dir=workdir)
    path = os.path.join(workdir, REPORT_FILE)
    with open(path, 'w') as f:
      json.dump(report, f, indent=1)
  print(format_report(report))
  print(f'wrote {path}')
  return report


def check_runs(runs: list[tuple[str, ml_collections.ConfigDict]], topology: str,
               vocab_size: int, path: str | None = None) -> list[dict]:
  """For each (name, config) of a sweep, whether its train call fits `topology` and the run's
  estimated time (train.num_steps x the estimated step), printed as a table row by row; runs that
  differ only in train.num_steps compile once. `vocab_size`: the models' vocabulary (the sweep's
  tokenizer's). Returns the rows, each with its compile report; with `path`, writes them there
  as JSON."""
  compiled, rows = {}, []
  print(f'{"run":<26}{"GiB a chip":>11}  {"fits":<5}{"ms a step":>10}{"MFU":>6}{"steps":>8}'
        f'{"hours":>8}{"chip-hours":>12}   (estimates, not measurements)', flush=True)
  for name, config in runs:
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.vocab_size = vocab_size
    train = {k: v for k, v in config.train.to_dict().items() if k != 'num_steps'}
    key = json.dumps([config.model.to_dict(), config.data.to_dict(), config.mesh.to_dict(),
                      train], sort_keys=True, default=str)
    if key not in compiled:
      compiled[key] = compile_run(config, topology, programs=('train',))
    report = compiled[key]
    memory, estimate = report['programs']['train']['memory'], report.get('estimate')
    steps = config.train.num_steps
    row = dict(name=name, total_bytes=memory['total'], fits=memory['fits'], steps=steps,
               step_s=None, mfu=None, hours=None, chip_hours=None, report=report)
    if estimate:
      row.update(step_s=estimate['step_s'], mfu=estimate['mfu'],
                 hours=estimate['step_s'] * steps / 3600,
                 chip_hours=estimate['step_s'] * steps / 3600 * report['chips'])
    rows.append(row)
    total = f'{memory["total"] / GiB:.2f}' if memory['total'] else '?'
    timing = (f'{1e3 * row["step_s"]:>10.1f}{100 * row["mfu"]:>5.0f}%{steps:>8}'
              f'{row["hours"]:>8.3g}{row["chip_hours"]:>12.3g}' if estimate else
              f'{"":>16}{steps:>8}')
    print(f'{name:<26}{total:>11}  {"yes" if memory["fits"] else "NO":<5}{timing}', flush=True)
  timed = [r for r in rows if r['hours'] is not None]
  print(f'{len(rows)} runs on {topology}, {sum(not r["fits"] for r in rows)} not fitting; the '
        f'{len(timed)} that fit: {sum(r["hours"] for r in timed):.1f} hours, '
        f'{sum(r["chip_hours"] for r in timed):.1f} chip-hours at the roofline estimate (a real '
        f'step is slower)', flush=True)
  if path:
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    with open(path, 'w') as f:
      json.dump(rows, f, indent=1)
    print(f'wrote {path}')
  return rows
