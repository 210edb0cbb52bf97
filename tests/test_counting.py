"""Parameter and FLOP counts against hand-computed formulas, against the parameter tree, and
(FLOPs) against the matmuls of the compiled forward and backward pass."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import LM, count_params, training_flops_per_token
from model.config import Mamba2Config
from train import hlo, step as step_lib
from tests.conftest import tiny


def compiled_flops_per_token(cfg, seq_len: int, batch: int = 2) -> float:
  """Matmul FLOPs per token of the compiled gradient of the language-modelling loss with respect
  to every parameter (forward and backward) on `batch` sequences, counted in its HLO text by
  train/hlo.py: a count of what the program does, independent of `training_flops_per_token`.
  It sees dots and convolutions only, so it leaves out what 6 x N counts for the parameters no
  matmul touches (norm scales, biases, per-channel vectors), done as elementwise work."""
  model = LM(cfg)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0),
                                        jnp.zeros((1, seq_len), jnp.int32)))['params']
  loss_fn = step_lib.make_loss_fn(model, dropout=False)
  tokens = jnp.zeros((batch, seq_len), jnp.int32)
  grad = jax.jit(jax.grad(lambda p, b: loss_fn(p, b, None)[0]))
  stats = hlo.analyze(grad.lower(params, {'inputs': tokens, 'targets': tokens}).compile()
                      .as_text())
  assert stats.unknown_loops == 0
  return stats.matmul_flops / (batch * seq_len)


def hand_count(V, D, H, K, Dh, F, L, swiglu, untied, learned_len=0):
  """Parameters of the attn*L stack with RMSNorm, no biases, written out by hand."""
  attention = D * H * Dh + 2 * D * K * Dh + H * Dh * D       # q, k, v, out
  mlp = (3 if swiglu else 2) * D * F
  norms = 2 * D
  embedding = V * D * (2 if untied else 1) + learned_len * D
  return embedding, L * (attention + mlp + norms) + D         # + final norm


@pytest.mark.parametrize('kw', [
    dict(),
    dict(num_kv_heads=2, activation='gelu'),
    dict(num_kv_heads=1, tie_embeddings=False, position='learned', pattern='attn*3'),
])
def test_param_counts_equal_the_hand_formula_and_the_tree(kw):
  cfg = tiny(**kw)
  emb, non_emb = hand_count(
      V=61, D=32, H=4, K=cfg.kv_heads, Dh=8, F=64, L=cfg.num_layers,
      swiglu=cfg.activation == 'swiglu', untied=not cfg.tie_embeddings,
      learned_len=64 if cfg.position == 'learned' else 0)
  counts = count_params(cfg)
  assert (counts.embedding, counts.non_embedding) == (emb, non_emb)
  assert counts.total == emb + non_emb == counts.embedding + counts.active_non_embedding
  params = LM(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))['params']
  assert counts.total == sum(np.size(x) for x in jax.tree.leaves(params))


def test_training_flops_per_token_by_hand():
  # attn*1, D 32, 4 heads of 8, SwiGLU 64, vocabulary 61, RMSNorm, tied head; 16 tokens.
  # Non-embedding parameters: q, k, v, out 4 x 32 x 32 = 4,096; SwiGLU 3 x 32 x 64 = 6,144;
  # two block norms and the final one 3 x 32 = 96: N = 10,336. 6 x (N + the head's 32 x 61 =
  # 1,952) = 73,728; attention 12 x 16 keys x 4 heads x 8 = 6,144: 79,872 in all.
  cfg = tiny(pattern='attn*1')
  assert training_flops_per_token(cfg, 16) == 79_872
  assert training_flops_per_token(cfg, 32) == 79_872 + 6_144     # twice the keys
  # A window of 4 scores 4 keys, not 16: 12 x 4 x 4 x 8 = 1,536. (Model FLOPs: the XLA
  # implementation scores all 16 keys and masks the rest.)
  assert training_flops_per_token(tiny(pattern='attn*1', attention_window=4), 16) == 75_264
  assert training_flops_per_token(tiny(pattern='attn*1', attention_window=64), 16) == 79_872


MAMBA2 = Mamba2Config(head_dim=8, d_state=16, n_groups=2, chunk_size=16)


@pytest.mark.parametrize('kw, seq_len, elementwise', [
    (dict(pattern='attn*1'), 16, 3 * 32),                    # the two block norms, the final one
    (dict(pattern='attn*1'), 32, 3 * 32),                    # the scores see twice the keys
    (dict(pattern='attn*2', num_kv_heads=2), 16, 5 * 32),    # k, v 32 x 16; scores per query head
    # Two chunks of 16. The convolution (shifted products) 640, dt_bias, A_log, D 24, the gated
    # norm 64, two norms 64. (With one chunk, L <= 16, the program does 4,096 fewer per token:
    # the state entering it is the zero initial state, the one leaving it feeds nothing.)
    (dict(pattern='mamba2*1', mamba2=MAMBA2), 32, 792),
])
def test_training_flops_are_the_compiled_matmuls_and_the_elementwise_parameters(kw, seq_len,
                                                                                elementwise):
  """`training_flops_per_token` against the matmul FLOPs of the compiled forward and backward
  pass (train/hlo.py, not the formula): equal but for 6 per token for each of the `elementwise`
  parameters that no matmul touches, which 6 x N counts as if one did."""
  cfg = tiny(**kw)
  assert compiled_flops_per_token(cfg, seq_len) == (training_flops_per_token(cfg, seq_len)
                                                    - 6 * elementwise)


def test_mamba2_param_count_and_flops_by_hand():
  # mamba2*1, D 32, Din 64 = 8 heads of P 8 in G 2 groups, N 16, conv 4, chunks of 16.
  # in_z, in_x 2 x 32 x 64 = 4,096; in_B, in_C 2 x 32 x 2 x 16 = 2,048; in_dt 32 x 8 = 256;
  # conv over x, B, C (64 + 64 channels) with biases 5 x 128 = 640; dt_bias, A_log, D 3 x 8 = 24;
  # the gated norm's scale 64; out 64 x 32 = 2,048; the block's norm 32: 9,208 per layer, and the
  # final norm 32: N = 9,240. Embedding 61 x 32 = 1,952.
  cfg = tiny(pattern='mamba2*1', mamba2=MAMBA2)
  counts = count_params(cfg)
  assert (counts.embedding, counts.non_embedding) == (1_952, 9_240)
  params = LM(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))['params']
  assert counts.total == sum(np.size(x) for x in jax.tree.leaves(params))
  # 6 x (9,240 + 1,952) = 67,152, plus SSD's products per token, x 3 for training, with chunks
  # of c = min(16, L): C.B 2 c G N, scores x Δx 2 c H P, chunk state and state readout 4 H P N.
  # L 16: 3 x (1,024 + 2,048 + 4,096) = 21,504. L 8: 3 x (512 + 1,024 + 4,096) = 16,896.
  assert training_flops_per_token(cfg, 16) == 67_152 + 21_504
  assert training_flops_per_token(cfg, 8) == 67_152 + 16_896
  assert training_flops_per_token(cfg, 64) == 67_152 + 21_504     # the chunk stays 16
