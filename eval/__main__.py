"""python -m eval --workdir=DIR: the validation loss of the latest checkpoint on the whole split.

Prints the loss (nats per token), perplexity and bits per character and byte, and writes them to
DIR/eval.json.
"""

import json
import os

from absl import flags

from train import cli

flags.DEFINE_string('workdir', None, 'Work directory of a training run.')
flags.DEFINE_integer('step', None, 'Checkpoint step to evaluate (default: the latest).')
flags.DEFINE_integer('batch_size', 64, 'Sequences per evaluation batch.')
flags.mark_flag_as_required('workdir')


def main(argv):
  del argv
  import jax

  from eval.restore import load_run
  from train import mesh as mesh_lib
  from train import step as step_lib, workdir as workdir_lib
  from train.errors import quiet_libraries
  from train.evaluate import evaluate
  from train.loop import put_batch
  quiet_libraries()
  workdir = flags.FLAGS.workdir
  run = load_run(workdir, flags.FLAGS.step)
  _, _, val_split = workdir_lib.prepare_data(run.config, workdir, write=False)
  sharding = mesh_lib.batch_sharding(run.mesh)
  result = evaluate(jax.jit(step_lib.make_eval_step(run.model)), run.params, val_split,
                    run.config.data.seq_len, flags.FLAGS.batch_size,
                    put=lambda b: put_batch(b, sharding))
  result['step'] = run.step
  print(f'step {run.step}: val_loss {result["val_loss"]:.4f}  '
        f'perplexity {result["val_perplexity"]:.3f}  '
        f'bits/char {result["val_bits_per_char"]:.4f}  '
        f'bits/byte {result["val_bits_per_byte"]:.4f}  ({result["val_tokens"]:,} tokens)')
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'eval.json'), 'w') as f:
      json.dump(result, f, indent=1)


if __name__ == '__main__':
  cli.run(main)
