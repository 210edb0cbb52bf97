"""python -m eval --workdir=DIR [--step=N] [--config.train.eval_batch_size=...]

The validation loss of a run's checkpoint (the latest by default) on the whole validation split:
loss (nats per token), perplexity, bits per character and byte, printed and written to
DIR/eval.json. --config is the run's own config, whose values `--config.x.y=...` overrides.
"""

import json
import os
import sys

from absl import flags

from train import cli

flags.DEFINE_string('workdir', None, 'Work directory of a training run.')
flags.DEFINE_integer('step', None, 'Checkpoint step to evaluate (default: the latest).')
flags.mark_flag_as_required('workdir')


def main(argv):
  del argv
  import jax

  from eval.restore import load_run
  from train import workdir as workdir_lib
  from train.errors import quiet_libraries
  from train.evaluate import evaluate
  from train.loop import sharded_eval_step
  quiet_libraries()
  f = flags.FLAGS
  run = load_run(f.workdir, f.step, f.config)
  _, _, val_split = workdir_lib.prepare_data(run.config, f.workdir, write=False)
  shardings = jax.tree.map(lambda x: x.sharding, run.params)
  eval_step = sharded_eval_step(run.model, run.mesh, shardings)
  result = evaluate(eval_step, run.params, val_split, run.config.data.seq_len,
                    run.config.train.eval_batch_size, run.mesh)
  result['step'] = run.step
  if jax.process_index() == 0:
    print(f'step {run.step}: val_loss {result["val_loss"]:.4f}  '
          f'perplexity {result["val_perplexity"]:.3f}  '
          f'bits/char {result["val_bits_per_char"]:.4f}  '
          f'bits/byte {result["val_bits_per_byte"]:.4f}  ({result["val_tokens"]:,} tokens)')
    with open(os.path.join(f.workdir, 'eval.json'), 'w') as out:
      json.dump(result, out, indent=1)


if __name__ == '__main__':
  cli.define_run_config(sys.argv)
  cli.run(main)
