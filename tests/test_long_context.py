"""Long context: RoPE scaling against each paper's formula, ALiBi's bias in float32."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from model import positions
from model.config import ConfigError, ModelConfig

DH, BASE = 16, 10000.0


def rotate_by_hand(x_D, angles_half):
  """Rotates pair (i, i + D/2) of x by angles_half[i], written out as 2x2 rotations in float64."""
  d = len(x_D)
  out = np.empty(d)
  for i, a in enumerate(angles_half):
    x1, x2 = x_D[i], x_D[i + d // 2]
    out[i] = math.cos(a) * x1 - math.sin(a) * x2
    out[i + d // 2] = math.sin(a) * x1 + math.cos(a) * x2
  return out


def theta(base=BASE, dh=DH):
  return np.asarray([base ** (-2 * i / dh) for i in range(dh // 2)])


def apply(x_D, position, scaling='none', factor=1.0, original_len=0, base=BASE):
  x = jnp.asarray(x_D, jnp.float32)[None, None, None, :]
  pos = jnp.full((1, 1), position, jnp.float32)
  return np.asarray(positions.rope(x, pos, base, scaling, factor, original_len))[0, 0, 0]


@pytest.fixture
def x():
  return np.random.default_rng(0).normal(size=DH)


@pytest.mark.parametrize('scaling', ['none', 'linear', 'ntk', 'yarn'])
def test_factor_one_is_the_identity(scaling, x):
  for m in (0, 3, 50, 700):
    np.testing.assert_allclose(apply(x, m, scaling, 1.0, 64), rotate_by_hand(x, m * theta()),
                               rtol=1e-4, atol=1e-4)


def test_linear_is_position_interpolation(x):
  """Chen et al. 2023: position m of the long context is position m / s of the trained one."""
  s = 4.0
  for m in (1, 37, 255):
    np.testing.assert_allclose(apply(x, m, 'linear', s), rotate_by_hand(x, (m / s) * theta()),
                               rtol=1e-4, atol=1e-4)


def test_ntk_raises_the_base(x):
  """NTK-aware: base' = base * s^(d / (d - 2)); the highest frequency is kept and the lowest is
  divided by exactly s."""
  s = 8.0
  new_theta = theta(BASE * s ** (DH / (DH - 2)))
  for m in (1, 37, 255):
    np.testing.assert_allclose(apply(x, m, 'ntk', s), rotate_by_hand(x, m * new_theta),
                               rtol=1e-4, atol=1e-4)
  assert new_theta[0] == theta()[0]
  np.testing.assert_allclose(new_theta[-1], theta()[-1] / s, rtol=1e-12)


def test_yarn_ramp_and_temperature(x):
  """Peng et al. 2023: r_i = L / lambda_i with wavelength lambda_i = 2 pi base^(2i/d); gamma = 0
  below alpha = 1 (interpolate by s), 1 above beta = 32 (keep), linear between; q and k each
  scaled by 0.1 ln s + 1, so the logits by its square."""
  s, original = 4.0, 512
  new_theta = []
  for i in range(DH // 2):
    wavelength = 2 * math.pi * BASE ** (2 * i / DH)
    r = original / wavelength
    gamma = 0.0 if r < 1 else 1.0 if r > 32 else (r - 1) / (32 - 1)
    t = BASE ** (-2 * i / DH)
    new_theta.append((1 - gamma) * t / s + gamma * t)
  new_theta = np.asarray(new_theta)
  # The ramp is exercised: some dimensions kept, some interpolated, some in between.
  ratio = new_theta / theta()
  assert ratio[0] == 1.0 and np.isclose(ratio[-1], 1 / s) and ((ratio > 1 / s) & (ratio < 1)).any()
  scale = 0.1 * math.log(s) + 1
  for m in (1, 37, 1500):
    np.testing.assert_allclose(apply(x, m, 'yarn', s, original),
                               scale * rotate_by_hand(x, m * new_theta), rtol=1e-4, atol=1e-4)
  # The logits' temperature: q.k at relative distance 0 is (0.1 ln s + 1)^2 q.k.
  q = apply(x, 100, 'yarn', s, original)
  np.testing.assert_allclose(q @ q, scale ** 2 * (x @ x), rtol=1e-4)


def test_scaled_attention_runs_and_differs_from_unscaled():
  """The config reaches the attention: a scaled model's logits differ from the unscaled one's past
  position 0 and agree at position 0 for the scalings that do not rescale logits."""
  import jax

  from model import LM
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 61, (1, 16)))
  base = ModelConfig(vocab_size=61, d_model=32, num_heads=4, d_ff=64, pattern='attn*1')
  params = LM(base).init(jax.random.key(0), tokens)
  plain = LM(base).apply(params, tokens)
  for scaling in ('linear', 'ntk', 'yarn'):
    cfg = base.replace(rope_scaling=scaling, rope_factor=4.0, rope_original_len=8)
    scaled = LM(cfg).apply(params, tokens)
    assert not np.allclose(plain[0, 1:], scaled[0, 1:], atol=1e-5)
    if scaling != 'yarn':
      np.testing.assert_allclose(plain[0, 0], scaled[0, 0], atol=1e-5)


@pytest.mark.parametrize('overrides,words', [
    (dict(rope_scaling='linear', rope_factor=0.5), 'rope_factor must be >= 1'),
    (dict(rope_scaling='yarn', rope_factor=4.0), 'rope_original_len'),
    (dict(position='alibi', rope_scaling='ntk', rope_factor=2.0), 'stretches RoPE'),
    (dict(rope_factor=2.0), 'does nothing'),
    (dict(rope_scaling='xpos'), 'rope_scaling=.xpos. is not known'),
])
def test_invalid_scaling_is_one_clear_error(overrides, words):
  with pytest.raises(ConfigError, match=words) as e:
    ModelConfig(**overrides)
  assert '\n' not in str(e.value)


def test_alibi_bias_is_float32_exact_at_long_distances():
  """-slope_h (q - k) exactly for distances up to 4096: in bfloat16 (8 bits of mantissa) the
  distances 1000 and 1001 would share one value."""
  q = jnp.arange(4096, dtype=jnp.int32)[None]
  bias = positions.alibi_bias(q[:, -3:], q, 8)
  assert bias.dtype == jnp.float32
  slopes = np.asarray([2.0 ** (-8 * (h + 1) / 8) for h in range(8)])
  distance = np.arange(4093, 4096)[:, None] - np.arange(4096)[None, :]
  expected = -slopes[:, None, None] * distance[None]
  np.testing.assert_allclose(np.asarray(bias[0]), expected, rtol=1e-6)
  assert jnp.asarray(1000.0, jnp.bfloat16) == jnp.asarray(1001.0, jnp.bfloat16)  # why float32


# ---------------------------------------------------------------------------------------------
# Loss by position (eval/loss.py).


@pytest.fixture(scope='module')
def trained_run(tmp_path_factory, tfds_dir):
  """A tiny RoPE run on tiny shakespeare, trained at 32 tokens, loaded back."""
  from train.restore import load_run
  from tests.conftest import run_config
  from train.loop import train_and_evaluate
  workdir = str(tmp_path_factory.mktemp('longctx') / 'run')
  config = run_config(tfds_dir, train=dict(num_steps=20, eval_every=0, checkpoint_every=20))
  train_and_evaluate(config, workdir)
  return workdir, load_run(workdir)


def test_positions_average_to_the_validation_loss(trained_run):
  """At the training length, the mean over positions of the per-position loss is the ordinary
  validation loss of the compiled evaluation step (train/evaluate.py) on the same batches."""
  from eval import loss as loss_lib
  from train.evaluate import compile_eval_step, evaluate
  workdir, run = trained_run
  data = run.objective.data(workdir, None)
  step = compile_eval_step(run.eval_step(), run.objective.eval_spec(), run.mesh, run.params,
                           run.frozen)
  ordinary = evaluate(step, run.params, run.frozen, run.objective, data, run.mesh)['val_loss']
  seq_len, batch_size = run.config.data.seq_len, run.config.train.eval_batch_size
  loss_L, weight_L = loss_lib.loss_by_position(run.model, run.params, data.validation.tokens,
                                               seq_len, batch_size)
  assert loss_L.shape == (seq_len,) and len(set(weight_L)) == 1  # every window counted once
  np.testing.assert_allclose(loss_L.mean(), ordinary, rtol=1e-5)
  # Buckets and prefixes are the same averages, regrouped.
  rows = loss_lib.buckets(loss_L, weight_L, 10)
  assert [(r['start'], r['end']) for r in rows] == [(0, 10), (10, 20), (20, 30), (30, 32)]
  np.testing.assert_allclose(rows[3]['loss'], loss_L[30:].mean(), rtol=1e-6)
  np.testing.assert_allclose(loss_lib.mean_over_prefixes(loss_L, weight_L, [seq_len])[seq_len],
                             ordinary, rtol=1e-5)
  # Past the trained length nothing is cropped: each of 4x longer windows is read whole, and its
  # first positions see what the trained-length windows' first positions see.
  long_L, long_w = loss_lib.loss_by_position(run.model, run.params, data.validation.tokens,
                                             4 * seq_len, batch_size)
  assert long_L.shape == (4 * seq_len,) and np.isfinite(long_L).all()
  assert long_w[0] == (len(data.validation.tokens) - 1) // (4 * seq_len)


def test_learned_positions_stop_at_their_table():
  from eval import loss as loss_lib
  cfg = ModelConfig(position='learned', max_len=64)
  loss_lib.check_length(cfg, 64)
  with pytest.raises(ConfigError, match=r'--seq_len \(65\) is longer than the learned position '
                                        r'table \(model.max_len=64\)'):
    loss_lib.check_length(cfg, 65)


# ---------------------------------------------------------------------------------------------
# The extrapolation experiment's configs (the runs themselves are minutes: docs/long_context.md).


def test_each_scheme_is_the_shared_config_with_its_positions():
  from experiments.configs import extrapolation as xp_config
  from experiments.extrapolation.__main__ import check_config, scheme_config
  config = xp_config.get_config()
  check_config(config)
  for scheme in config.sweep.schemes:
    c = scheme_config(config, scheme)
    assert 'sweep' not in c and c.data.seq_len == config.data.seq_len
    cfg = ModelConfig.from_dict(dict(c.model.to_dict(), vocab_size=65))
    if scheme == 'mamba':
      assert {m for m, _ in cfg.layers} == {'mamba'} and cfg.position == 'none'
      assert cfg.mamba.scan_impl == config.sweep.mamba_scan_impl
    else:
      assert cfg.position == scheme and cfg.pattern == config.model.pattern
    assert cfg.max_len == (config.data.seq_len if scheme == 'learned' else config.model.max_len)
  config.sweep.lengths = (128, 64)
  with pytest.raises(ConfigError, match='must rise from the training length'):
    check_config(config)


def test_a_scaling_is_not_a_different_model_for_init_from_or_resume():
  """Fine-tuning a shorter run with a RoPE scaling (--init_from) keeps its parameter tree; so does
  a run saved before the rope_* fields existed."""
  from experiments.configs import base
  from train import workdir as workdir_lib
  saved = base.model_config().to_dict()
  scaled = dict(saved, rope_scaling='yarn', rope_factor=4.0, rope_original_len=64)
  assert workdir_lib.model_differences(saved, scaled) == []
  older = {k: v for k, v in saved.items() if not k.startswith('rope_') or k == 'rope_base'}
  assert workdir_lib.model_differences(older, scaled) == []
  assert workdir_lib.model_differences(saved, dict(saved, rope_base=500000.0))  # still a change
