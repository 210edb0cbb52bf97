"""The same training run on one device or a mesh: data, FSDP, tensor (and expert) parallelism,
checkpoints across meshes, bad meshes, and two processes training together.

This process sees one device; the checks that need 8 run in one subprocess of 8 simulated CPU
devices (tests/on_eight_devices.py), and the two-process run launches `python -m train` twice.
"""

import json
import os
import socket
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh

from experiments.configs import shakespeare_char
from model import counting
from tests.conftest import tiny
from train import data as data_lib
from train import mesh as mesh_lib
from train.loop import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (pattern, mesh axes other than data, which takes the remaining devices) of the 8-device checks.
# The MoE layer adds ('attn:moe*2', {'expert': 4}).
CASES = [
    ('attn*2', {'data': 8}),
    ('attn*2', {'data': 2, 'fsdp': 4}),
    ('attn*2', {'data': 2, 'fsdp': 2, 'tensor': 2}),
    ('attn*2', {'tensor': 8}),
    ('attn:moe*2', {'data': 2, 'expert': 4}),
]


def xla_flags(devices: int) -> str:
  return f'{os.environ.get("XLA_FLAGS", "")} --xla_force_host_platform_device_count={devices}'


@pytest.fixture(scope='module')
def eight(tmp_path_factory, tfds_dir):
  """The results of tests/on_eight_devices.py for CASES (one subprocess: one JAX start-up)."""
  tmp = tmp_path_factory.mktemp('eight')
  spec = tmp / 'spec.json'
  spec.write_text(json.dumps({'cases': CASES, 'workdir': str(tmp), 'tfds_dir': tfds_dir}))
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'tests', 'on_eight_devices.py'), str(spec),
       str(tmp / 'out.npz')],
      cwd=ROOT, env=dict(os.environ, XLA_FLAGS=xla_flags(8)), capture_output=True, text=True,
      timeout=600)
  assert result.returncode == 0, result.stderr[-5000:]
  return dict(np.load(tmp / 'out.npz'))


@pytest.mark.slow
@pytest.mark.parametrize('case', range(len(CASES)),
                         ids=[f'{p}-{"-".join(f"{k}{v}" for k, v in m.items())}' for p, m in CASES])
def test_one_step_on_a_mesh_equals_the_single_device_step(eight, case):
  np.testing.assert_allclose(eight[f'{case}/mesh/loss'], eight[f'{case}/ref/loss'], rtol=1e-6)
  np.testing.assert_allclose(eight[f'{case}/mesh/grad_norm'], eight[f'{case}/ref/grad_norm'],
                             rtol=1e-5)
  ref = sorted(k for k in eight if k.startswith(f'{case}/ref/params/'))
  assert len(ref) >= 8  # every parameter of the model, not a few
  for key in ref:
    np.testing.assert_allclose(eight[key.replace('/ref/', '/mesh/')], eight[key], atol=1e-6,
                               err_msg=key)


# Which mesh axis splits each logical axis, as the issue asks: FSDP the width, tensor parallelism
# the vocabulary, heads and MLP, expert parallelism the experts. Everything else is replicated.
SPLIT_BY = {'embed': 'fsdp', 'vocab': 'tensor', 'heads': 'tensor', 'kv_heads': 'tensor',
            'mlp': 'tensor', 'exp': 'expert'}


def test_parameter_bytes_per_device_shrink_as_the_mesh_splits_them(eight):
  for case, (pattern, sizes) in enumerate(CASES):
    cfg = tiny(vocab_size=64, num_heads=8, pattern=pattern)  # tests/on_eight_devices.py's model
    expected = 0
    boxed = counting.abstract_params(cfg)
    for leaf in jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)):
      split = np.prod([sizes.get(SPLIT_BY.get(name), 1) for name in leaf.names])
      expected += leaf.value.size * 4 // split
    assert int(eight[f'{case}/bytes']) == expected, (pattern, sizes)
  full = 4 * counting.count_params(tiny(vocab_size=64, num_heads=8)).total
  assert int(eight['0/bytes']) == full                   # data parallelism replicates
  assert int(eight['1/bytes']) < full / 3                # FSDP over 4: all but the norm scales


def test_a_checkpoint_saved_on_one_mesh_restores_on_another(eight):
  saved = sorted(k for k in eight if k.startswith('restore/saved/'))
  assert len(saved) > 20  # parameters and both Adam moments
  for key in saved:
    np.testing.assert_array_equal(eight[key.replace('/saved/', '/restored/')], eight[key])
  assert eight['restore/on_target_mesh']  # laid out on data=8, not as saved on 2 x 4


def test_a_mesh_that_does_not_divide_the_model_fails_before_compiling(eight):
  error = str(eight['bad_mesh/error'])
  assert "tensor=8 does not divide dimension 1 of parameter blocks/layer_0/mixer/key" in error
  assert "logical axis 'kv_heads', size 4" in error and 'model.num_kv_heads' in error
  assert int(eight['bad_mesh/compiles']) == 0


def test_checks_name_the_mesh_axis_the_logical_axis_and_the_dimension():
  def mesh(**sizes):
    shape = dict(dict(data=1, fsdp=1, tensor=1, expert=1), **sizes)
    return AbstractMesh(tuple(shape.values()), tuple(shape))

  fits = counting.abstract_params(tiny(vocab_size=64, num_heads=8, d_ff=64))
  mesh_lib.check_params(fits, mesh(data=2, fsdp=4))   # every split dimension is divisible
  mesh_lib.check_params(fits, mesh(tensor=8))
  cases = [
      (tiny(vocab_size=64, num_heads=4), mesh(tensor=8),
       "tensor=8 does not divide dimension 2 of parameter blocks/layers_0_to_1/mixer/key/kernel "
       "(logical axis 'kv_heads', size 4)"),
      (tiny(vocab_size=64, num_heads=4, num_kv_heads=1), mesh(tensor=2),
       "(logical axis 'kv_heads', size 1); make model.num_kv_heads (by default "
       "model.num_heads) a multiple of 2"),
      (tiny(vocab_size=65), mesh(tensor=2),
       "(logical axis 'vocab', size 65); set model.vocab_size to a multiple of 2"),
      (tiny(vocab_size=64), mesh(fsdp=3), "(logical axis 'embed', size 32)"),
  ]
  for cfg, m, message in cases:
    with pytest.raises(mesh_lib.MeshError) as e:
      mesh_lib.check_params(counting.abstract_params(cfg), m)
    assert message in str(e.value)
  with pytest.raises(mesh_lib.MeshError, match=r'train.batch_size=12 is not divisible by the 8 '
                     r'batch shards of the mesh \(data=2 x fsdp=4 x expert=1'):
    mesh_lib.check_batch(12, mesh(data=2, fsdp=4), 'train.batch_size')
  mesh_lib.check_batch(12, mesh(data=2, tensor=4), 'train.batch_size')  # tensor splits no rows
  with pytest.raises(mesh_lib.MeshError, match='has 4 devices but 8 are present'):
    mesh_lib.mesh_shape({'data': 2, 'fsdp': 2, 'tensor': 1, 'expert': 1}, 8)


def test_each_process_evaluates_its_rows_of_every_batch():
  tokens = np.arange(1000) % 61
  whole = list(data_lib.eval_batches(tokens, 8, batch_size=6))
  parts = [list(data_lib.eval_batches(tokens, 8, batch_size=6, process_index=p, process_count=3))
           for p in range(3)]
  assert len(whole) == 21 and all(len(p) == len(whole) for p in parts)
  for b, batch in enumerate(whole):
    for key in ('inputs', 'targets', 'weights'):  # the last batch's padding rows included
      np.testing.assert_array_equal(np.concatenate([p[b][key] for p in parts]), batch[key])
  assert whole[-1]['weights'][:, 0].tolist() == [1, 1, 1, 1, 0, 0]


def test_distributed_starts_only_when_launched_as_several():
  assert not mesh_lib.launched_as_several({})
  assert not mesh_lib.launched_as_several({'SLURM_NTASKS': '1', 'TPU_WORKER_HOSTNAMES': 'a'})
  for environ in ({'JAX_COORDINATOR_ADDRESS': '10.0.0.1:1234'}, {'SLURM_NTASKS': '4'},
                  {'OMPI_COMM_WORLD_SIZE': '2'}, {'JAX_NUM_PROCESSES': '2'},
                  {'TPU_WORKER_HOSTNAMES': 'w0,w1,w2,w3'}):
    assert mesh_lib.launched_as_several(environ), environ
  # Only decisions not to start: starting would tie this test process to a coordinator.
  assert not mesh_lib.initialize_distributed('auto', environ={})
  assert not mesh_lib.initialize_distributed('off', environ={'SLURM_NTASKS': '4'})
  with pytest.raises(mesh_lib.MeshError, match="--distributed='yes' is not known"):
    mesh_lib.initialize_distributed('yes', environ={})


@pytest.mark.slow
def test_two_processes_train_together_like_one_process(tfds_dir, tmp_path):
  """`python -m train` on two localhost processes of 2 CPU devices each (gloo collectives), as on
  two hosts: the same losses as one device, with metrics and checkpoints written once."""
  overrides = {'data.tfds_data_dir': tfds_dir, 'model.d_model': 32, 'model.d_ff': 64,
               'model.pattern': 'attn*2', 'train.num_steps': 2, 'train.steps_per_call': 1,
               'train.log_every': 1, 'train.eval_every': 0, 'train.checkpoint_every': 2,
               'train.batch_size': 8, 'train.eval_batch_size': 64, 'train.peak_flops': 1e11}
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  workdir = str(tmp_path / 'two')
  args = [sys.executable, '-m', 'train', '--config=experiments/configs/shakespeare_char.py',
          f'--workdir={workdir}', '--config.mesh.fsdp=2', f'--coordinator_address=localhost:{port}',
          '--num_processes=2', *[f'--config.{k}={v}' for k, v in overrides.items()]]
  env = dict(os.environ, XLA_FLAGS=xla_flags(2))
  procs = [subprocess.Popen(args + [f'--process_id={i}'], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
  try:
    outs = [p.communicate(timeout=600) for p in procs]
  finally:  # a process whose peer crashed would wait for it
    for p in procs:
      p.kill()
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-5000:]
  (out0, err0), (out1, err1) = outs
  assert "4 x cpu (cpu) in 2 processes, mesh {'data': 2, 'fsdp': 2" in err0  # the start-up report
  assert '2 sequences per device' in err0
  assert 'done: step 2' in out0 and 'done' not in out1 and 'processes' not in err1  # 0 reports

  config = shakespeare_char.get_config()
  for key, value in overrides.items():
    section, name = key.split('.')
    config[section][name] = value
  single = train_and_evaluate(config, str(tmp_path / 'one'))
  rows = {name: [json.loads(line) for line in open(tmp_path / name / 'metrics.jsonl')]
          for name in ('two', 'one')}
  assert [r['step'] for r in rows['two']] == [r['step'] for r in rows['one']] == [1, 2]  # one row a step
  for a, b in zip(rows['two'], rows['one']):
    for key in ('train_loss', 'grad_norm', 'val_loss'):
      if key in b:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, err_msg=key)
  assert np.isclose(rows['two'][-1]['val_loss'], single['val_loss'], rtol=1e-5)
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['2']
