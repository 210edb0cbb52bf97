"""Shared fixtures: tiny model configs and the shared tiny-shakespeare corpus."""

import importlib.util
import os

# Tests check behaviour, not speed: XLA's backend optimisations off halves every compile, and the
# suite is mostly compiles of tiny programs. Set before JAX creates its CPU backend.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                           + ' --xla_backend_optimization_level=0').strip()

import pytest  # noqa: E402

from experiments.configs import base  # noqa: E402
from model import ModelConfig  # noqa: E402
from train.mesh import prepare_backend  # noqa: E402

# As every command: the CPU flags users run with, and no TPU attempt where CI installs libtpu
# (tests/test_compile_for.py) but has no TPU.
prepare_backend()

SHAKESPEARE = base.TINY_SHAKESPEARE

# Tests that compile for a TPU slice (train/compile_for.py) need libtpu; CI installs it.
needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec('libtpu') is None,
    reason="needs libtpu, the TPU compiler: pip install -e '.[tpu]' (CI installs it)")


def tiny(**overrides) -> ModelConfig:
  """A model small enough that a test compiles and runs it in about a second."""
  kw = dict(vocab_size=61, d_model=32, num_heads=4, d_ff=64, pattern='attn*2', max_len=64)
  kw.update(overrides)
  return ModelConfig(**kw)


@pytest.fixture(scope='session')
def shakespeare_path() -> str:
  assert os.path.exists(SHAKESPEARE), f'the shared corpus is missing: {SHAKESPEARE}'
  return SHAKESPEARE


@pytest.fixture(scope='session')
def tfds_dir(tmp_path_factory) -> str:
  """One TFDS data directory for the session: the corpus is prepared once."""
  return str(tmp_path_factory.mktemp('tfds'))


def run_config(tfds_data_dir: str, **sections):
  """A tiny training run on tiny shakespeare: overrides per section, e.g. train=dict(lr=1e-2)."""
  c = base.get_config()
  c.model.update(d_model=32, num_heads=4, d_ff=64, pattern='attn*2', scan_layers=False)
  c.data.update(path=SHAKESPEARE, tfds_data_dir=tfds_data_dir, tokenizer='char', seq_len=32)
  c.train.update(num_steps=40, batch_size=8, lr=3e-3, min_lr=3e-4, warmup_steps=5,
                 steps_per_call=10, log_every=10, eval_every=20, eval_batches=2,
                 eval_batch_size=32, checkpoint_every=20, keep_checkpoints=2, peak_flops=1e11)
  for name, values in sections.items():
    c[name].update(values)
  return c
