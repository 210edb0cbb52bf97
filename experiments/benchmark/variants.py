"""python -m experiments.benchmark.variants --workdir=DIR
    [--config=experiments/configs/variants_benchmark.py] [--config.variants=mlp_layout,clip_norm]

One-off variants of a computation, each timed in two forms that compute the same thing, the
BENCHMARKS.md figures that once came from uncommitted scripts (issue 33):

- mlp_layout: an MLP of the Nanda grokking shape (D -> F -> D with biases, ReLU, sum-of-squares
  loss), the jitted gradient with respect to its parameters, with activations (B, L, D) through a
  (B, L, K) x (K, N) `dot_general` ('3d', flax's `DenseGeneral`) against the same matmuls on
  (B·L, D) ('2d', `model.layers.projection_dot` on CPU), at each length in `mlp.lengths`;
- clip_norm: optax's `clip_by_global_norm` ('optax': a sum of squares per leaf) against the same
  clipping with the global norm as one `jnp.vdot` per leaf ('vdot'), jitted, on a gradient tree
  of random values with the parameter shapes of `clip.model` (nanogpt_cpu's). This is the
  clipping alone, not inside the train step: swapping it into `train.loop.train_call` would mean
  patching `train.optim.make_optimizer`, which the step calls for itself;
- attention: causal attention as einsums ('einsum': 'blkgd,bskd->bkgls', float32 softmax, a causal
  `where`) against `jax.nn.dot_product_attention` ('xla'), the jitted gradient of the sum of
  squares of its output with respect to q, k and v, at `attention`'s shape (nanogpt_cpu's).

Each case first checks that its two forms agree (the largest absolute difference of their
outputs, relative to the largest output, is reported as `max_rel_diff`), then runs `rounds`
rounds, each timing the two forms one after the other (`train.perf.timed`: the median of `repeats`
calls after a warm-up call), in an order that alternates from round to round. Prints each round's
ms per call and the ratio of the medians (the first form's time over the second's), and writes
DIR/variants_benchmark.json.
"""

from __future__ import annotations

import json
import os

import numpy as np
from absl import flags

from train import cli


def mlp_layout(c) -> list[tuple[str, dict]]:
  """Per length L: the jitted parameter gradient of the MLP with activations (B, L, D) ('3d') and
  (B·L, D) ('2d'), and its arguments, B = mlp.rows."""
  import jax
  import jax.numpy as jnp

  m = c.mlp
  keys = jax.random.split(jax.random.key(0), 5)
  params = {'w_in_DxF': jax.random.normal(keys[0], (m.d_model, m.d_ff)) / m.d_model ** 0.5,
            'b_in_F': 0.1 * jax.random.normal(keys[1], (m.d_ff,)),
            'w_out_FxD': jax.random.normal(keys[2], (m.d_ff, m.d_model)) / m.d_ff ** 0.5,
            'b_out_D': 0.1 * jax.random.normal(keys[3], (m.d_model,))}
  last = (((2,), (0,)), ((), ()))  # contract the activations' last axis with the kernel's first

  def loss_3d(p, x_BxLxD):
    h_BxLxF = jax.nn.relu(jax.lax.dot_general(x_BxLxD, p['w_in_DxF'], last) + p['b_in_F'])
    y_BxLxD = jax.lax.dot_general(h_BxLxF, p['w_out_FxD'], last) + p['b_out_D']
    return jnp.sum(y_BxLxD ** 2)

  def loss_2d(p, x_BxLxD):
    x_NxD = x_BxLxD.reshape(-1, x_BxLxD.shape[-1])
    h_NxF = jax.nn.relu(x_NxD @ p['w_in_DxF'] + p['b_in_F'])
    return jnp.sum((h_NxF @ p['w_out_FxD'] + p['b_out_D']) ** 2)

  cases = []
  for length in m.lengths:
    x_BxLxD = jax.random.normal(keys[4], (m.rows, length, m.d_model))
    cases.append((f'L = {length} ({m.rows:,} x {length} x {m.d_model})',
                  {form: (jax.jit(jax.grad(loss)), (params, x_BxLxD))
                   for form, loss in (('3d', loss_3d), ('2d', loss_2d))}))
  return cases


def clip_norm(c) -> list[tuple[str, dict]]:
  """The jitted clipping of a random gradient tree with `clip.model`'s parameter shapes, by
  optax ('optax') and with a global norm of one vdot per leaf ('vdot'), at `clip.grad_clip`."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import optax

  from model import LM, ModelConfig

  model = LM(ModelConfig.from_dict(c.clip.model))
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  leaves, tree = jax.tree.flatten(shapes['params'])
  keys = jax.random.split(jax.random.key(1), len(leaves))
  grads = jax.tree.unflatten(tree, [jax.random.normal(k, s.shape, s.dtype)
                                    for k, s in zip(keys, leaves)])
  max_norm = c.clip.grad_clip
  by_optax = optax.clip_by_global_norm(max_norm)
  state = by_optax.init(grads)

  def clip_optax(g):
    return by_optax.update(g, state)[0]

  def clip_vdot(g):
    norm = jnp.sqrt(sum(jnp.vdot(x, x) for x in jax.tree.leaves(g)))
    # optax's scaling, so that only the norm's form differs
    return jax.tree.map(lambda x: jnp.where(norm < max_norm, x, x / norm * max_norm), g)

  return [(f'{c.clip.model.pattern}, width {c.clip.model.d_model}, '
           f'{sum(x.size for x in leaves):,} parameters',
           {'optax': (jax.jit(clip_optax), (grads,)), 'vdot': (jax.jit(clip_vdot), (grads,))})]


def attention(c) -> list[tuple[str, dict]]:
  """The jitted gradient (q, k, v) of causal attention's summed squares as einsums ('einsum') and
  by `jax.nn.dot_product_attention` ('xla'), at `attention`'s batch, length and heads."""
  import jax
  import jax.numpy as jnp

  from model import ModelConfig

  cfg = ModelConfig.from_dict(c.attention.model)
  B, L, H, K, Dh = c.attention.batch, c.attention.seq_len, cfg.num_heads, cfg.kv_heads, cfg.dh
  kq, kk, kv = jax.random.split(jax.random.key(0), 3)
  q_BxLxHxDh = jax.random.normal(kq, (B, L, H, Dh))
  k_BxLxKxDh = jax.random.normal(kk, (B, L, K, Dh))
  v_BxLxKxDh = jax.random.normal(kv, (B, L, K, Dh))

  def einsum(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh):
    # query head h = k G + g reads kv head k, as dot_product_attention groups them
    q_BxLxKxGxDh = q_BxLxHxDh.reshape(B, L, K, H // K, Dh) / Dh ** 0.5
    scores_BxKxGxLxS = jnp.einsum('blkgd,bskd->bkgls', q_BxLxKxGxDh, k_BxSxKxDh)
    causal_LxS = jnp.tril(jnp.ones((L, L), bool))
    scores_BxKxGxLxS = jnp.where(causal_LxS, scores_BxKxGxLxS.astype(jnp.float32), -jnp.inf)
    probs_BxKxGxLxS = jax.nn.softmax(scores_BxKxGxLxS, axis=-1).astype(v_BxSxKxDh.dtype)
    out = jnp.einsum('bkgls,bskd->blkgd', probs_BxKxGxLxS, v_BxSxKxDh)
    return jnp.sum(out.reshape(B, L, H, Dh) ** 2)

  def xla(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh):
    return jnp.sum(jax.nn.dot_product_attention(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh,
                                                is_causal=True) ** 2)

  args = (q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh)
  return [(f'B {B}, L {L}, {H} heads ({K} kv) of {Dh}',
           {form: (jax.jit(jax.grad(loss, argnums=(0, 1, 2))), args)
            for form, loss in (('einsum', einsum), ('xla', xla))})]


VARIANTS = {'mlp_layout': mlp_layout, 'clip_norm': clip_norm, 'attention': attention}


def max_rel_diff(a, b) -> float:
  """The largest absolute difference of two output trees over the largest absolute output."""
  import jax
  pairs = list(zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  scale = max(float(np.max(np.abs(x))) for x, _ in pairs)
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in pairs) / scale


def measure(name: str, c) -> list[dict]:
  """The variant's rows, one per case: each form's ms per call in every round, their medians,
  the ratio of the medians (first form over second) and the forms' `max_rel_diff`."""
  from train.perf import timed

  rows = []
  for case, programs in VARIANTS[name](c):
    outputs = [fn(*args) for fn, args in programs.values()]
    row = {'variant': name, 'case': case, 'forms': list(programs),
           'max_rel_diff': max_rel_diff(*outputs), 'ms': {form: [] for form in programs}}
    for r in range(c.rounds):
      for form in list(programs)[::1 if r % 2 == 0 else -1]:
        fn, args = programs[form]
        row['ms'][form].append(1e3 * timed(fn, *args, repeats=c.repeats))
    row['median_ms'] = {form: float(np.median(ms)) for form, ms in row['ms'].items()}
    first, second = row['forms']
    row['ratio'] = row['median_ms'][first] / row['median_ms'][second]
    rows.append(row)
  return rows


def run(c, workdir: str) -> dict:
  """Measures `c.variants`, prints the table and writes DIR/variants_benchmark.json."""
  from model.config import ConfigError
  from train.perf import device_description

  names = [n for n in c.variants.split(',') if n]
  unknown = [n for n in names if n not in VARIANTS]
  if unknown or not names:
    raise ConfigError(f'config.variants={c.variants!r}: choose among {list(VARIANTS)}')
  os.makedirs(workdir, exist_ok=True)
  result = {'device': device_description(), 'rounds': c.rounds, 'repeats': c.repeats,
            'rows': [row for name in names for row in measure(name, c)]}
  print(format_table(result))
  with open(os.path.join(workdir, 'variants_benchmark.json'), 'w') as f:
    json.dump(result, f, indent=1)
  return result


def format_table(result: dict) -> str:
  lines = [f'{result["device"]}: ms per call, {result["rounds"]} interleaved rounds of the '
           f'median of {result["repeats"]} calls', '',
           '| variant | case | first form, ms | second form, ms | ratio (first / second) | '
           'max rel. diff |', '|' + ' --- |' * 6]
  for r in result['rows']:
    first, second = r['forms']
    rounds = {form: ' / '.join(f'{ms:.2f}' for ms in r['ms'][form]) for form in r['forms']}
    lines.append(f'| {r["variant"]} | {r["case"]} | {first}: {rounds[first]} | '
                 f'{second}: {rounds[second]} | {r["ratio"]:.2f}x | {r["max_rel_diff"]:.1e} |')
  return '\n'.join(lines)


def main(argv):
  del argv
  run(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == '__main__':
  cli.command(main, 'Where variants_benchmark.json is written.', config='variants_benchmark.py',
              makes='experiment')
