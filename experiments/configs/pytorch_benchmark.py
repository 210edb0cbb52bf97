"""nanoGPT's CPU recipe in PyTorch beside nexttoken's nanogpt_cpu (experiments/benchmark/pytorch.py
and experiments/benchmark/torch_gpt.py); needs `pip install -e '.[peer]'` (PyTorch, CPU build):

  python -m experiments.benchmark.pytorch --workdir=runs/pytorch_benchmark   # ~6 min on 2 cores
  python -m experiments.benchmark.torch_gpt --workdir=runs/torch_gpt         # PyTorch alone
  python -m experiments.benchmark.pytorch --workdir=DIR --config.nanogpt_dir=~/nanoGPT

The shape is nanoGPT's README recipe for a CPU (`train.py config/train_shakespeare_char.py
--device=cpu --compile=False --block_size=64 --batch_size=12 --n_layer=4 --n_head=4
--n_embd=128 --dropout=0.0`): no biases (train.py's default), AdamW with lr 1e-3, betas
(0.9, 0.99), weight decay 0.1 on the 2-D weights, gradients clipped at 1.0.

`variants` adds PyTorch timings with other harness choices to every round, e.g.
--config.variants='optimizer=fused;optimizer=foreach;sample_batches=true read_loss=true'
(`;` between variants, spaces between one variant's overrides of the keys below).
"""

from ml_collections import ConfigDict

from experiments.configs import base


def get_config(preset=''):
  c = ConfigDict()
  # The model: nanoGPT's GPT at the recipe's shape.
  c.n_layer = 4
  c.n_head = 4
  c.n_embd = 128
  c.block_size = 64             # context
  c.vocab_size = 65             # tiny shakespeare's characters
  c.batch_size = 12
  c.lr = 1e-3
  c.beta2 = 0.99
  c.weight_decay = 0.1
  c.grad_clip = 1.0
  c.nanogpt_dir = ''            # a nanoGPT checkout: time its model.GPT instead of ours
  # The harness: what one timed step does, and how it is timed.
  c.threads = 2                 # torch.set_num_threads
  c.omp_wait_policy = ''        # OMP_WAIT_POLICY for PyTorch's OpenMP threads: '' (spin a while,
                                # then sleep: libgomp's default) | passive | active
  c.optimizer = 'default'       # AdamW: default (nanoGPT on a CPU) | foreach | fused
  c.set_to_none = True          # optimizer.zero_grad(set_to_none=...), as nanoGPT
  c.sample_batches = False      # draw each step's batch from a token array, as train.py does
  c.read_loss = False           # loss.item() every step, as train.py's log_interval=1 does
  c.matmul_precision = 'highest'  # torch.set_float32_matmul_precision
  c.steps_per_timing = 10       # steps between two clock reads
  c.warmup = 2                  # untimed timings first
  c.repeats = 20                # timings; the median counts
  # The interleaved comparison (experiments/benchmark/pytorch.py).
  c.rounds = 3                  # each round runs every entry once, each in a fresh process
  c.nexttoken_repeats = 20      # python -m experiments.benchmark --config.repeats
  c.variants = ''               # more PyTorch entries: ';'-separated sets of 'key=value ...'
  return base.with_preset(c, preset)
