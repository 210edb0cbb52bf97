"""Speed without changing what is computed: the schedule's length as data (one compile for runs
that differ only in their length), a stable MFU denominator, and the benchmark timing the loop's
own program."""

import json
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from train import perf as perf_lib

from conftest import run_config
from train import optim
from train.loop import train_and_evaluate


def optax_schedule(tc):
  """The schedule as it was written before its length became data: optax's own schedules."""
  warmup = min(tc.warmup_steps, tc.num_steps)
  if tc.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, tc.lr, warmup, max(tc.num_steps, warmup + 1),
                                              end_value=tc.min_lr)
  ramp = optax.linear_schedule(0.0, tc.lr, warmup)
  decay = (optax.linear_schedule(tc.lr, tc.min_lr, max(tc.num_steps - warmup, 1))
           if tc.schedule == 'linear' else optax.constant_schedule(tc.lr))
  return optax.join_schedules([ramp, decay], [warmup])


@pytest.mark.parametrize('schedule', ['cosine', 'linear', 'constant'])
def test_schedule_with_a_traced_length_equals_optax(schedule):
  for warmup, num_steps in [(10, 100), (0, 7), (20, 12)]:
    check_schedule(schedule, warmup, num_steps)


def check_schedule(schedule, warmup, num_steps):
  """Eager, the values are optax's to the bit; compiled with the length traced, within an ulp of
  optax's compiled with the length a constant (XLA turns a division by a constant into a
  multiplication)."""
  tc = ml_collections.ConfigDict(dict(lr=3e-3, min_lr=2e-4, warmup_steps=warmup,
                                      num_steps=num_steps, schedule=schedule))
  counts = jnp.arange(num_steps + 5)
  np.testing.assert_array_equal(jax.vmap(optim.learning_rate_schedule(tc))(counts),
                                optax_schedule(tc)(counts))
  traced = jax.jit(lambda n: jax.vmap(optim.learning_rate_schedule(tc, n))(counts))(num_steps)
  constant = jax.jit(lambda: optax_schedule(tc)(counts))()
  np.testing.assert_allclose(traced, constant, rtol=3e-7, atol=0)


def spy_on_train_call(monkeypatch):
  """The calls of `train.loop.train_call`, the one builder of the train call, as they happen."""
  from train import loop
  calls, build = [], loop.train_call

  def spy(model, *args, **kwargs):
    calls.append(model.config)
    return build(model, *args, **kwargs)
  monkeypatch.setattr(loop, 'train_call', spy)
  return calls


@pytest.mark.slow
def test_runs_differing_only_in_length_compile_the_train_step_once(tfds_dir, tmp_path, caplog,
                                                                   monkeypatch):
  """Two runs, 10 and 20 steps: one compile of the multi-step, and the second run's learning
  rates follow its own (longer) schedule."""
  from train import executables
  executables.clear()  # an earlier test may have compiled this very program
  built = spy_on_train_call(monkeypatch)
  jax.config.update('jax_log_compiles', True)
  try:
    with caplog.at_level(logging.WARNING, logger='jax'):
      rows = {}
      for steps in (10, 20):
        config = run_config(tfds_dir, train=dict(num_steps=steps, eval_every=0,
                                                 checkpoint_every=0, log_every=1,
                                                 eval_batch_size=512))
        train_and_evaluate(config, str(tmp_path / f'run{steps}'))
        rows[steps] = config
  finally:
    jax.config.update('jax_log_compiles', False)
  compiles = [r.getMessage() for r in caplog.records
              if 'Finished XLA compilation of jit(multi_step)' in r.getMessage()]
  assert len(compiles) == 1, compiles
  assert len(built) == 2  # each run built its call with the one builder
  for steps, config in rows.items():
    with open(tmp_path / f'run{steps}' / 'metrics.jsonl') as f:
      lrs = [json.loads(line)['lr'] for line in f if '"lr"' in line]
    expected = optax_schedule(config.train)(jnp.arange(steps))
    np.testing.assert_allclose(lrs, expected, rtol=1e-6, atol=0)  # float32 ulps


def test_programs_of_one_text_whose_inputs_differ_are_not_shared():
  """An input the program never reads is left out of its text: the executable kept for inputs
  (x, {'teacher': y}) must not be handed to a call with (x, None)."""
  from train import executables, mesh as mesh_lib
  mesh = mesh_lib.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1, 'expert': 1})
  program = jax.jit(lambda x, frozen: x * 2)
  x = jnp.ones(3)
  with_teacher = executables.compile(program.lower(x, {'teacher': jnp.ones(2)}), mesh)
  without = executables.compile(program.lower(x, None), mesh)
  assert without is not with_teacher
  np.testing.assert_array_equal(without(x, None), 2 * x)


class FakeDevice:
  def __init__(self, platform, device_kind, process_index=0):
    self.platform, self.device_kind, self.process_index = platform, device_kind, process_index


def test_known_accelerators_read_their_published_peak_per_chip():
  from train import perf
  assert perf.known_peak('TPU v5 lite') == 197e12
  assert perf.known_peak('TPU v5') == 459e12 and perf.known_peak('TPU v5p') == 459e12
  assert perf.known_peak('NVIDIA H100 80GB HBM3') == 989e12
  assert perf.known_peak('NVIDIA A100-SXM4-40GB') == 312e12
  assert perf.known_peak('cpu') is None
  flops, source = perf.peak('bfloat16', devices=[FakeDevice('tpu', 'TPU v6 lite')] * 8)
  assert flops == 8 * 918e12 and 'published' in source
  assert perf.peak('bfloat16', override=3e12, devices=[FakeDevice('tpu', 'TPU v4')])[0] == 3e12


@pytest.fixture
def measured(monkeypatch, tmp_path):
  """The CPU peak measured into a cache under tmp_path: a list of the measurements taken."""
  from train import perf
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
  calls = []

  def measure(dtype, repeats=5):
    calls.append(dtype)
    return 1e11 * len(calls)  # a different figure at every measurement
  monkeypatch.setattr(perf, 'measure_peak_flops', measure)
  monkeypatch.setattr(perf, 'cpu_formula_peak', lambda: None)  # this machine's: not here
  return calls


def test_a_cpu_peak_is_measured_once_per_machine_then_read_from_the_cache(measured, tmp_path):
  from train import perf
  cpu = [FakeDevice('cpu', 'cpu')]
  first, source = perf.peak('float32', devices=cpu)
  assert 'measured now' in source and measured == ['float32']
  again, source = perf.peak('float32', devices=cpu)  # a resumed run, a second run
  assert again == first == 1e11 and 'cached' in source and measured == ['float32']
  with open(tmp_path / 'nexttoken' / 'peak_flops.json') as f:
    assert list(json.load(f).values()) == [1e11]
  perf.peak('bfloat16', devices=cpu)  # another dtype is another measurement
  assert measured == ['float32', 'bfloat16']


def test_simulated_cpu_devices_share_one_cpu_peak(measured):
  from train import perf
  one = perf.peak('float32', devices=[FakeDevice('cpu', 'cpu')])[0]
  four = perf.peak('float32', devices=[FakeDevice('cpu', 'cpu')] * 4)[0]
  assert four == one  # MFU must not fall 4x because one CPU is shown as four devices
  two_hosts = [FakeDevice('cpu', 'cpu', i // 2) for i in range(4)]
  assert perf.peak('float32', devices=two_hosts)[0] == 2 * one
  # with the real device list too (one or several simulated devices: the same figure)
  assert perf.peak('float32')[0] == one


def test_the_benchmark_times_the_call_the_loop_builds(monkeypatch):
  """The loop's builder builds the benchmark's call, and what the benchmark times is that very
  program: the fake clock advances only while it runs (1 s a run, 1 step a run)."""
  from test_benchmark import spy_on_the_train_call, tiny_shape
  import experiments.benchmark.__main__ as benchmark
  spied = spy_on_the_train_call(monkeypatch, seconds=1.0)
  row = benchmark.bench_train('tiny', tiny_shape(), steps_per_call=1, repeats=2, peak=1e11)
  assert spied.built == [(32, 2)]
  assert len(spied.fed) == 3  # its warm-up run and both timed runs
  assert row['step_ms'] == 1e3


def test_cpu_xla_flags_join_the_users_and_keep_the_users_value():
  from train.mesh import prepare_backend
  environ = {'XLA_FLAGS': '--xla_force_host_platform_device_count=2', 'JAX_PLATFORMS': 'cpu'}
  prepare_backend(environ)
  assert environ['XLA_FLAGS'] == ('--xla_force_host_platform_device_count=2 '
                                  '--xla_cpu_experimental_ynn_fusion_type=')
  prepare_backend(environ)  # a second call adds nothing
  assert environ['XLA_FLAGS'].count('ynn_fusion_type') == 1
  mine = {'XLA_FLAGS': '--xla_cpu_experimental_ynn_fusion_type=dot', 'JAX_PLATFORMS': 'cpu'}
  prepare_backend(mine)
  assert mine['XLA_FLAGS'] == '--xla_cpu_experimental_ynn_fusion_type=dot'


def test_commands_compile_cpu_matmuls_without_ynnpack(tmp_path):
  """The flag reaches XLA: a program compiled after `prepare_backend` has no YNNPACK fusion, one
  compiled with XLA's defaults has (the check would otherwise pass for a flag XLA ignores)."""
  import os
  import subprocess
  import sys
  script = ('import sys\n'
            'if sys.argv[1] == "commands":\n'
            '  from train.mesh import prepare_backend; prepare_backend()\n'
            'import jax, jax.numpy as jnp\n'
            'f = jax.jit(lambda a, b: jnp.tanh(a @ b)).lower(jnp.ones((64, 32)), jnp.ones((32, 64)))\n'
            'print("__ynn_fusion" in f.compile().as_text())\n')
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['JAX_PLATFORMS'] = 'cpu'
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  has_ynn = {how: subprocess.run([sys.executable, '-c', script, how], cwd=root, env=env,
                                 capture_output=True, text=True, check=True).stdout.split()[-1]
             for how in ('commands', 'xla_defaults')}
  assert has_ynn == {'commands': 'False', 'xla_defaults': 'True'}


CPU_FORMULA_PEAK = perf_lib.cpu_formula_peak  # the real one (the `measured` fixture hides it)
CPUINFO = '''processor\t: 0
model name\t: AMD EPYC
cpu MHz\t\t: 2500.000
flags\t\t: fpu sse2 avx fma avx2
processor\t: 1
cpu MHz\t\t: 2400.000
flags\t\t: fpu sse2 avx fma avx2
'''


def test_a_cpu_peak_is_never_below_its_cores_formula(measured, tmp_path, monkeypatch):
  """A matmul timed on a busy machine (here 1e11) cannot lower the peak under cores x clock x
  FLOPs a cycle: 2 cores x 2.5 GHz x (2 FMA units x 8 AVX2 lanes x 2) = 160 GFLOP/s."""
  from train import perf
  path = tmp_path / 'cpuinfo'
  path.write_text(CPUINFO)
  monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 1})
  flops, how = CPU_FORMULA_PEAK(str(path))
  assert flops == 2 * 2.5e9 * 32 and '2 cores x 2.50 GHz x 32 FLOP/cycle' in how
  path.write_text(CPUINFO.replace('avx fma avx2', 'avx512f avx2'))
  assert CPU_FORMULA_PEAK(str(path))[0] == 2 * 2.5e9 * 64
  assert CPU_FORMULA_PEAK(str(tmp_path / 'absent')) is None

  monkeypatch.setattr(perf, 'cpu_formula_peak', lambda: (160e9, 'the formula'))
  peak, source = perf.peak('float32', devices=[FakeDevice('cpu', 'cpu')])
  assert peak == 160e9 and 'the formula' in source and measured == ['float32']


def test_a_run_faster_than_its_peak_measures_again_and_raises_it(measured):
  from train import perf
  cpu = [FakeDevice('cpu', 'cpu')]
  assert perf.raised_peak(1e11, 0.9e11, 'float32', devices=cpu) is None  # below: kept
  new, note = perf.raised_peak(1e11, 1.5e11, 'float32', devices=cpu)
  # measured again (1e11, still low): never below what the run achieved
  assert new == 1.5e11 and '100 -> 150 GFLOP/s' in note and measured == ['float32']
  new, _ = perf.raised_peak(1.5e11, 1.8e11, 'float32', devices=cpu)  # measured 2e11 now
  assert new == 2e11 and measured == ['float32', 'float32']
  assert perf.peak('float32', devices=cpu)[0] == 2e11  # the cache keeps the faster figure
