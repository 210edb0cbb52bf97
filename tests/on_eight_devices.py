"""The checks of tests/test_mesh.py that need 8 devices, in one process of 8 simulated CPU devices
(the rest of the suite sees one device, so they run here, in a subprocess):

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/on_eight_devices.py SPEC OUT

SPEC is a JSON file: {"cases": [[pattern, {mesh axis: size}], ...], "workdir": DIR,
"tfds_dir": DIR}. OUT (.npz) receives, for case i:
  i/ref/* and i/mesh/*: loss, grad_norm and updated parameters (params/<path>) after one training
      step from the same state and batch, on one device and on the case's mesh;
  i/bytes: the parameter bytes one device holds on the mesh;
then restore/*: a state saved on data=2 x fsdp=4 and restored on data=8, with the saved values;
then bad_mesh/*: the error of a run whose heads the tensor axis does not divide, and how many
programs were compiled before it.
"""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from model import LM, ModelConfig  # noqa: E402
from tests.conftest import run_config, tiny  # noqa: E402
from train import checkpoint as ckpt_lib  # noqa: E402
from train import loop, optim, step as step_lib  # noqa: E402
from train import mesh as mesh_lib  # noqa: E402

# Adam's first step moves each parameter by lr * g / (|g| + eps): with eps well above the float32
# noise of tiny gradients it is a smooth function of the gradient, so sharded and single-device
# steps agree to float32 tolerance instead of differing where a gradient is ~0.
TRAIN = ml_collections.ConfigDict(dict(
    lr=1e-2, min_lr=1e-2, warmup_steps=0, num_steps=10, schedule='constant', b1=0.9, b2=0.95,
    eps=1e-3, weight_decay=0.1, weight_decay_exclude=('scale', 'bias'), grad_clip=1.0))
BATCH, SEQ_LEN, VOCAB = 8, 16, 64


def model_config(pattern: str) -> ModelConfig:
  """Every dimension that a mesh axis splits is a multiple of 8."""
  return tiny(vocab_size=VOCAB, num_heads=8, pattern=pattern)


def mesh_of(sizes: dict, devices):
  return mesh_lib.make_mesh(dict(dict(data=-1, fsdp=1, tensor=1, expert=1), **sizes), devices)


def one_step(cfg: ModelConfig, mesh, batch):
  """(state, metrics) after one training step on `mesh`, through the functions that the training
  loop uses."""
  model, optimizer = LM(cfg), optim.make_optimizer(TRAIN)
  state, shardings = loop.init_state(model, optimizer, mesh, seed=0)
  train_step = step_lib.make_train_step(model, optimizer, optim.learning_rate_schedule(TRAIN),
                                        seed=0)
  multi_step = loop.sharded_multi_step(train_step, mesh, shardings)
  steps = mesh_lib.batch_sharding(mesh, leading_axes=1)
  return multi_step(state, mesh_lib.put_batch(batch, steps))


def flat(tree, prefix: str) -> dict:
  return {f'{prefix}/{jax.tree_util.keystr(path)}': np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


def equivalence(cases, out: dict) -> dict:
  """Returns the state after one step on data=2 x fsdp=4 of the first pattern, for `restore`."""
  tokens = np.random.RandomState(0).randint(0, VOCAB, (1, BATCH, SEQ_LEN + 1)).astype(np.int32)
  batch = {'inputs': tokens[..., :-1], 'targets': tokens[..., 1:]}
  references = {}
  saved = None
  for i, (pattern, sizes) in enumerate(cases):
    cfg = model_config(pattern)
    if pattern not in references:
      after, metrics = one_step(cfg, mesh_of({}, jax.devices()[:1]), batch)
      references[pattern] = (after, metrics)
    after_ref, metrics_ref = references[pattern]
    mesh = mesh_of(sizes, jax.devices())
    after, metrics = one_step(cfg, mesh, batch)
    for name, (state, m) in (('ref', (after_ref, metrics_ref)), ('mesh', (after, metrics))):
      out[f'{i}/{name}/loss'] = np.asarray(m['loss'])
      out[f'{i}/{name}/grad_norm'] = np.asarray(m['grad_norm'])
      out.update(flat(state.params, f'{i}/{name}/params'))
    out[f'{i}/bytes'] = np.asarray(loop.bytes_per_device(after.params))
    if dict(mesh.shape) == dict(data=2, fsdp=4, tensor=1, expert=1) and saved is None:
      saved = (cfg, after)
  return saved


def restore(saved, workdir: str, out: dict) -> None:
  """Saves a state sharded on data=2 x fsdp=4 and restores it onto data=8 (8 x 1)."""
  cfg, state = saved
  checkpointer = ckpt_lib.Checkpointer(workdir)
  checkpointer.save(1, state.params, state.opt_state, {'next_index': 1})
  checkpointer.wait()
  target = mesh_of({'data': 8}, jax.devices())
  shardings = loop.state_shardings(LM(cfg), optim.make_optimizer(TRAIN), target)
  params, opt_state, _ = checkpointer.restore(
      1, ckpt_lib.abstract_like(state.params, shardings.params),
      ckpt_lib.abstract_like(state.opt_state, shardings.opt_state))
  checkpointer.close()
  out.update(flat((state.params, state.opt_state), 'restore/saved'))
  out.update(flat((params, opt_state), 'restore/restored'))
  on_target = [leaf.sharding.is_equivalent_to(s, leaf.ndim) for leaf, s in
               zip(jax.tree.leaves((params, opt_state)),
                                 jax.tree.leaves((shardings.params, shardings.opt_state)))]
  out['restore/on_target_mesh'] = np.asarray(all(on_target))


def bad_mesh(tfds_dir: str, workdir: str, out: dict) -> None:
  """A run with 4 heads on tensor=8 fails before compiling anything."""
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, duration, **kw: compiles.append(event)
      if event == '/jax/core/compile/backend_compile_duration' else None)
  config = run_config(tfds_dir, mesh=dict(data=1, tensor=8))
  try:
    loop.train_and_evaluate(config, workdir)
    out['bad_mesh/error'] = np.asarray('')
  except mesh_lib.MeshError as e:
    out['bad_mesh/error'] = np.asarray(str(e))
  out['bad_mesh/compiles'] = np.asarray(len(compiles))


def main(spec_path: str, out_path: str) -> None:
  assert jax.device_count() == 8, jax.devices()
  with open(spec_path) as f:
    spec = json.load(f)
  out = {}
  saved = equivalence(spec['cases'], out)
  restore(saved, os.path.join(spec['workdir'], 'restore'), out)
  bad_mesh(spec['tfds_dir'], os.path.join(spec['workdir'], 'bad_mesh'), out)
  np.savez(out_path, **out)


if __name__ == '__main__':
  main(*sys.argv[1:])
