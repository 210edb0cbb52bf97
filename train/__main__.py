"""python -m train --config=experiments/configs/shakespeare_char.py --workdir=DIR [--config.k=v]

Trains the configured model in DIR, resuming from its latest checkpoint when there is one.
With --compile_for=TOPOLOGY (e.g. v5p:2x2x2) it trains nothing: it compiles the run for that TPU
slice on this machine and reports whether it fits and how fast it should run (docs/tpu.md).

On several hosts, run the same command on each: `jax.distributed` starts first (see --distributed),
and every process trains its share of each batch on the mesh of all hosts' devices.
"""


from absl import flags

from train import cli

flags.DEFINE_string('init_from', None, 'Start from the parameters and tokenizer of the run in this '
                    'work directory (fine-tuning, other data); the same as '
                    '--config.train.init_from. It is only read.')
flags.DEFINE_enum('distributed', 'auto', ['auto', 'on', 'off'],
                  'Start jax.distributed: "auto" when a coordinator or several processes are '
                  'given (flags below, JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, Slurm, Open '
                  'MPI, GKE TPU slices), "on" always (Cloud TPU pod slices: JAX reads the rest '
                  'from the TPU metadata), "off" never.')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-host GPU/CPU).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-host GPU/CPU).')
flags.DEFINE_integer('process_id', None, 'This process\'s index, 0 .. num_processes - 1.')
flags.DEFINE_string('compile_for', None,
                    'A TPU slice, GENERATION:AxB[xC] in chips (v5e:4x4, v5p:2x2x2): compile this '
                    'run for it ahead of time on this machine (libtpu: pip install -e ".[tpu]"), '
                    'print per chip whether it fits and its estimated speed, write '
                    'DIR/compile.json; trains nothing (docs/tpu.md).')


def main(argv):
  del argv
  f = flags.FLAGS
  cli.require_config(f.config)
  # Imports after flag parsing (importing jax is slow, --help should not wait); jax.distributed
  # starts before anything creates a JAX backend.
  from train import loop
  from train import mesh as mesh_lib
  if f.compile_for:
    from train.compile_for import compile_for
    compile_for(f.config, f.workdir, f.compile_for)
    return
  mesh_lib.initialize_distributed(f.distributed, f.coordinator_address, f.num_processes,
                                  f.process_id)
  config = f.config
  if f.init_from is not None:
    config = config.copy_and_resolve_references()
    config.train.init_from = f.init_from
  loop.train_and_evaluate(config, f.workdir)


if __name__ == '__main__':
  cli.command(main, 'Work directory: config, tokenizer, checkpoints, metrics.', makes='run')
