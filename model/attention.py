"""Causal self-attention with grouped-query heads on `jax.nn.dot_product_attention`.

`num_kv_heads` equal to `num_heads` is multi-head attention, 1 is multi-query, between is GQA:
`jax.nn.dot_product_attention` takes K kv heads against H query heads directly. Its
`implementation` is the config's `attention_impl` ('xla' everywhere, 'cudnn' on NVIDIA GPUs with
bfloat16); 'elementwise' computes the same attention as products summed over the head's
dimensions, for a handful of keys on CPU (`Attention._explicit`). `attention_window` W > 0 makes
it sliding-window attention: each token sees itself and the W - 1 tokens before it. In decode
mode, keys and values go to a cache of fixed length S in the 'cache' collection; each call writes
its T new entries at the cache index and attends over the cache.

Attention weights are captured on request: applied with `mutable=['intermediates']`, each layer
computes its softmax explicitly and sows it as 'attention_weights', (B, H, L, S) in float32
(model/capture.py collects them). Otherwise the probabilities are never materialised by this
module: the fused `dot_product_attention` runs, and training pays nothing for the option.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from model import positions
from model.registry import Layer, register_mixer
from model.config import ModelConfig
from model.layers import ACT_BLHD, dense, head_rmsnorm, output_std

CAPTURE = 'intermediates'  # the collection that, when mutable, makes each layer sow its weights


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token of the score and value products (PaLM's 12 * L * H * Q * T per
  layer): 2 * T * H * Dh for q.k and as much for p.v, times 3 for forward + backward, where T is
  the keys a query is scored against: the sequence, or the `attention_window` when shorter. The
  causal mask's skipped half is counted too, as PaLM and nanoGPT count it."""
  keys = min(seq_len, cfg.attention_window) if cfg.attention_window else seq_len
  return 12.0 * keys * cfg.num_heads * cfg.dh


@register_mixer('attn', default_ffn='mlp', extra_flops_per_token=attention_flops_per_token,
                last_only=True)
class Attention(Layer):
  """With `last_only`, the last position's query alone reads every position's key and value, and
  the output, (B, 1, D), is that position's (the final layer of an answer-only model)."""
  last_only: bool = False

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL):
    cfg = self.config
    H, K, Dh = cfg.num_heads, cfg.kv_heads, cfg.dh
    T = 1 if self.last_only else x_BxLxD.shape[1]  # queries: the last T positions
    q_BxTxHxDh = dense(cfg, (H, Dh), ('embed', 'heads', 'kv'), 'query')(x_BxLxD[:, -T:])
    q_pos_BxT, k_pos_BxS = positions_BxL[:, -T:], positions_BxL
    k_BxLxKxDh = dense(cfg, (K, Dh), ('embed', 'kv_heads', 'kv'), 'key')(x_BxLxD)
    v_BxLxKxDh = dense(cfg, (K, Dh), ('embed', 'kv_heads', 'kv'), 'value')(x_BxLxD)
    if cfg.qk_norm:
      q_BxTxHxDh = head_rmsnorm(cfg, 'query_norm')(q_BxTxHxDh)
      k_BxLxKxDh = head_rmsnorm(cfg, 'key_norm')(k_BxLxKxDh)
    if cfg.position == 'rope':
      scaling = (cfg.rope_base, cfg.rope_scaling, cfg.rope_factor, cfg.rope_original_len)
      q_BxTxHxDh = positions.rope(q_BxTxHxDh, q_pos_BxT, *scaling)
      k_BxLxKxDh = positions.rope(k_BxLxKxDh, positions_BxL, *scaling)
    q_BxTxHxDh = nn.with_logical_constraint(q_BxTxHxDh, ACT_BLHD)

    window = cfg.attention_window or None
    if self.decode and self.has_variable('cache', 'cached_key'):
      k_BxLxKxDh, v_BxLxKxDh, q_pos_BxL, k_pos_BxS = self._update_cache(k_BxLxKxDh, v_BxLxKxDh)
      q_pos_BxT = q_pos_BxL[:, -T:]
    elif self.decode:  # `init` in decode mode: create the cache at this call's length
      self._update_cache(k_BxLxKxDh, v_BxLxKxDh)
    mask = None  # queries and keys at the same positions: the causal (and window) mask by index
    if q_pos_BxT.shape[1] != k_pos_BxS.shape[1] or self.decode:  # otherwise by position
      offset_BxTxS = q_pos_BxT[:, :, None] - k_pos_BxS[:, None, :]
      mask = (offset_BxTxS >= 0) & (offset_BxTxS < (window or offset_BxTxS.shape[-1] + 1))
      mask = mask[:, None]                                                  # (B, 1, T, S)
    bias = None
    if cfg.position == 'alibi':  # float32 whatever the compute dtype: bfloat16 has 8 bits of
      # mantissa, so distances past 256 would share one bias
      bias = positions.alibi_bias(q_pos_BxT, k_pos_BxS, H)
    if self.is_mutable_collection(CAPTURE) or cfg.attention_impl == 'elementwise':
      out_BxTxHxDh = self._explicit(q_BxTxHxDh, k_BxLxKxDh, v_BxLxKxDh, bias, q_pos_BxT,
                                    k_pos_BxS, window, cfg.attention_impl == 'elementwise')
    else:
      out_BxTxHxDh = jax.nn.dot_product_attention(
          q_BxTxHxDh, k_BxLxKxDh, v_BxLxKxDh, bias=bias, mask=mask, is_causal=mask is None,
          local_window_size=(window - 1, 0) if window and mask is None else None,
          implementation=cfg.attention_impl)
    return dense(cfg, cfg.d_model, ('heads', 'kv', 'embed'), 'out', std=output_std(cfg),
                 in_axis=(-2, -1))(out_BxTxHxDh)

  def _explicit(self, q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, bias, q_pos_BxT, k_pos_BxS, window,
                elementwise: bool):
    """The attention `dot_product_attention` computes, with its probabilities written out (and
    sown when the capture collection is mutable): the mask from the positions (causal, and the
    window when there is one), query head h reading kv head h // (H / K) as jax's grouped-query
    attention does, softmax in float32.

    `elementwise` forms the scores and the outputs as products summed over the head's dimensions
    and over the keys, instead of batched matmuls: XLA's CPU compiler runs a batched matmul as one
    small GEMM per (batch row, head), which for a few keys (a grokking model's query against its
    3 positions: 3,831 x 4 GEMMs of 1 x 32 by 32 x 3) cost more than the arithmetic. It holds a
    (B, T, S, H, Dh) product, so it is for short contexts only."""
    H, K, Dh = q_BxTxHxDh.shape[2], k_BxSxKxDh.shape[2], q_BxTxHxDh.shape[3]
    k_BxSxHxDh = jnp.repeat(k_BxSxKxDh, H // K, axis=2)
    v_BxSxHxDh = jnp.repeat(v_BxSxKxDh, H // K, axis=2)
    if elementwise:
      scores_BxTxSxH = jnp.sum(q_BxTxHxDh[:, :, None].astype(jnp.float32)
                               * k_BxSxHxDh[:, None].astype(jnp.float32), axis=-1)
    else:
      scores_BxTxSxH = jnp.einsum('bthd,bshd->btsh', q_BxTxHxDh, k_BxSxHxDh,
                                  preferred_element_type=jnp.float32)
    scores_BxTxSxH = scores_BxTxSxH / jnp.sqrt(jnp.float32(Dh))
    if bias is not None:  # (B or 1, H, T, S)
      scores_BxTxSxH = scores_BxTxSxH + jnp.moveaxis(bias, 1, -1)
    offset_BxTxS = q_pos_BxT[:, :, None] - k_pos_BxS[:, None, :]
    mask_BxTxS = (offset_BxTxS >= 0) & (offset_BxTxS < (window or offset_BxTxS.shape[-1] + 1))
    scores_BxTxSxH = jnp.where(mask_BxTxS[..., None], scores_BxTxSxH, -jnp.inf)
    probs_BxTxSxH = jax.nn.softmax(scores_BxTxSxH, axis=2)
    if self.is_mutable_collection(CAPTURE):
      self.sow(CAPTURE, 'attention_weights', jnp.transpose(probs_BxTxSxH, (0, 3, 1, 2)))
    probs_BxTxSxH = probs_BxTxSxH.astype(v_BxSxHxDh.dtype)
    if elementwise:
      return jnp.sum(probs_BxTxSxH[..., None] * v_BxSxHxDh[:, None], axis=2)
    return jnp.einsum('btsh,bshd->bthd', probs_BxTxSxH, v_BxSxHxDh)

  def _update_cache(self, k_BxTxKxDh, v_BxTxKxDh):
    """Writes T new keys and values at the cache index; returns the whole cache (S slots), the
    new tokens' positions (B, T) and the slots' positions (B, S). Slot s holds position s."""
    initialised = self.has_variable('cache', 'cached_key')
    cached_k = self.variable('cache', 'cached_key', jnp.zeros, k_BxTxKxDh.shape, k_BxTxKxDh.dtype)
    cached_v = self.variable('cache', 'cached_value', jnp.zeros, v_BxTxKxDh.shape, v_BxTxKxDh.dtype)
    index = self.variable('cache', 'cache_index', lambda: jnp.zeros((), jnp.int32))
    if not initialised:
      return None
    B, T = k_BxTxKxDh.shape[:2]
    S = cached_k.value.shape[1]
    start = index.value
    cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k_BxTxKxDh, (0, start, 0, 0))
    cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v_BxTxKxDh, (0, start, 0, 0))
    index.value = start + T
    q_pos_BxT = jnp.broadcast_to(start + jnp.arange(T), (B, T))
    k_pos_BxS = jnp.broadcast_to(jnp.arange(S), (B, S))
    return cached_k.value, cached_v.value, q_pos_BxT, k_pos_BxS
