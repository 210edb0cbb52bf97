"""python -m eval --workdir=DIR [--step=N] [--config.train.eval_batch_size=...]

The validation metrics of a run's checkpoint (the latest by default) on the whole validation
split, those of its objective (train/objectives/: for a language model the loss in nats per
token, perplexity, bits per character and byte), printed and written to DIR/eval.json. --config is
the run's own config, whose values `--config.x.y=...` overrides.
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
  from train.errors import quiet_libraries
  from train.evaluate import compile_eval_step, evaluate
  quiet_libraries()
  f = flags.FLAGS
  run = load_run(f.workdir, f.step, f.config)
  data = run.objective.data(f.workdir, None)
  eval_step = compile_eval_step(run.eval_step(), run.objective.eval_spec(),
                                run.mesh, run.params, run.frozen)
  result = evaluate(eval_step, run.params, run.frozen, run.objective, data, run.mesh)
  result['step'] = run.step
  if jax.process_index() == 0:
    print(f'step {run.step}: ' + '  '.join(
        f'{k} {v:,}' if isinstance(v, int) else f'{k} {v:.4f}' for k, v in result.items()
        if k != 'step'))
    with open(os.path.join(f.workdir, 'eval.json'), 'w') as out:
      json.dump(result, out, indent=1)


if __name__ == '__main__':
  cli.define_run_config(sys.argv)
  cli.run(main)
