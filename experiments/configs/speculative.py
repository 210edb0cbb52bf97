"""Speculative decoding on tiny shakespeare: a 6 x 256 target, a 1 x 64 draft, K = 1..8.

  python -m experiments.speculative --workdir=runs/speculative
  python -m experiments.speculative --workdir=runs/speculative_again \
      --target=runs/speculative/target --draft=runs/speculative/draft      # measure only
  python -m experiments.speculative --workdir=runs/speculative_quick \
      --config=experiments/configs/speculative.py:quick   # K = 1, 2, 4, short
      # 318 s at a load of 7 (177 CPU s)

Both models are trained by the one loop (train.loop.train_and_evaluate) on the character-level
corpus with shakespeare_char's recipe, each for its own number of steps; then the target alone
(model.decode.generate) and speculative decoding (model.speculative.speculative_generate) each generate
`bench.max_new_tokens` tokens from the same prompt, batch 1, at every temperature of
`bench.temperatures`, timed `bench.repeats` times after compiling (medians), alternating with the
target alone. About 20 minutes on a loaded 2-core CPU (the target's training is 11 of them);
measured figures in docs/speculative.md.
"""

from ml_collections import ConfigDict

from experiments.configs import base, shakespeare_char


def get_config(preset=''):
  c = shakespeare_char.get_config()
  c.train.update(eval_every=0, checkpoint_every=0, log_every=50, steps_per_call=25)
  c.target = ConfigDict(dict(
      model=dict(d_model=256, num_heads=8, d_ff=688, pattern='attn*6'), num_steps=600))
  c.draft = ConfigDict(dict(
      model=dict(d_model=64, num_heads=2, d_ff=172, pattern='attn'), num_steps=3000))
  c.bench = ConfigDict(dict(num_draft=tuple(range(1, 9)), temperatures=(0.0, 1.0),
                            max_new_tokens=256, repeats=5, prompt='ROMEO:', seed=0))
  return base.with_preset(c, preset, quick={
      'target.num_steps': 200, 'draft.num_steps': 400, 'bench.num_draft': (1, 2, 4),
      'bench.temperatures': (0.0,), 'bench.max_new_tokens': 64, 'bench.repeats': 2})
