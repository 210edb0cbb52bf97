"""python -m experiments.benchmark.torch_gpt --workdir=DIR
    [--config=experiments/configs/pytorch_benchmark.py]

The PyTorch peer of nexttoken's nanogpt_cpu benchmark: a GPT of nanoGPT's architecture (learned
positions, pre-LayerNorm blocks without biases, causal attention through
`scaled_dot_product_attention`, a GELU MLP of width 4 D, the head tied to the token embedding,
GPT-2's initialisation) written here from the architecture, not copied, trained eagerly as
nanoGPT's train.py trains it: forward, backward, gradients clipped to norm 1, AdamW (weight decay
on the 2-D weights only, as its configure_optimizers), zero_grad. `--config.nanogpt_dir=PATH`
times the `model.GPT` of a nanoGPT checkout instead, to check this one against it.

Timing: `warmup` untimed timings, then `repeats` timings of `steps_per_timing` steps each; tokens/s
is batch x context x steps over the median timing. Prints one line and writes DIR/torch_gpt.json;
the harness's choices (threads, AdamW's implementation, ...) are config keys, recorded there.
Needs PyTorch (`pip install -e '.[peer]'`); without it, says so in one line, exit status 2.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time

import numpy as np
from absl import flags

from train import cli


class PeerMissing(Exception):
  """PyTorch, or the nanoGPT checkout asked for, is not there."""


def import_torch():
  try:
    import torch
  except ImportError as e:
    raise PeerMissing(f'PyTorch is not installed ({e}); the PyTorch peer needs '
                      f"pip install -e '.[peer]'") from None
  return torch


def gpt(config):
  """Our GPT at the config's shape (a torch.nn.Module whose forward(idx_BxL, targets_BxL) returns
  (logits_BxLxV, mean loss)), or nanoGPT's from `nanogpt_dir`."""
  torch = import_torch()
  torch.manual_seed(1337)
  if config.nanogpt_dir:
    path = os.path.expanduser(config.nanogpt_dir)
    if not os.path.exists(os.path.join(path, 'model.py')):
      raise PeerMissing(f'config.nanogpt_dir={config.nanogpt_dir}: no model.py there; give a '
                        f'checkout of https://github.com/karpathy/nanoGPT')
    # By its path: `import model` is nexttoken's package.
    spec = importlib.util.spec_from_file_location('nanogpt_model', os.path.join(path, 'model.py'))
    nanogpt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nanogpt)
    return nanogpt.GPT(nanogpt.GPTConfig(
        block_size=config.block_size, vocab_size=config.vocab_size, n_layer=config.n_layer,
        n_head=config.n_head, n_embd=config.n_embd, dropout=0.0, bias=False))
  return _model_classes(torch)(config)


def _model_classes(torch):
  """The GPT class, defined once torch is imported (the module imports without it)."""
  nn, F = torch.nn, torch.nn.functional

  class LayerNorm(nn.Module):
    """LayerNorm with a gain and no bias."""

    def __init__(self, d: int):
      super().__init__()
      self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
      return F.layer_norm(x, (x.shape[-1],), self.weight, None, 1e-5)

  class Block(nn.Module):
    def __init__(self, d: int, heads: int):
      super().__init__()
      self.heads = heads
      self.norm_attn, self.norm_mlp = LayerNorm(d), LayerNorm(d)
      self.qkv = nn.Linear(d, 3 * d, bias=False)
      self.attn_out = nn.Linear(d, d, bias=False)
      self.up = nn.Linear(d, 4 * d, bias=False)
      self.down = nn.Linear(4 * d, d, bias=False)

    def forward(self, x_BxLxD):
      B, L, D = x_BxLxD.shape
      qkv = self.qkv(self.norm_attn(x_BxLxD))
      # (B, L, 3 D) -> three (B, H, L, Dh)
      q_BxHxLxDh, k_BxHxLxDh, v_BxHxLxDh = (
          t.view(B, L, self.heads, D // self.heads).transpose(1, 2) for t in qkv.split(D, dim=2))
      y_BxHxLxDh = F.scaled_dot_product_attention(q_BxHxLxDh, k_BxHxLxDh, v_BxHxLxDh,
                                                  is_causal=True)
      x_BxLxD = x_BxLxD + self.attn_out(y_BxHxLxDh.transpose(1, 2).reshape(B, L, D))
      return x_BxLxD + self.down(F.gelu(self.up(self.norm_mlp(x_BxLxD))))

  class GPT(nn.Module):
    def __init__(self, config):
      super().__init__()
      d = config.n_embd
      self.token_embedding = nn.Embedding(config.vocab_size, d)  # also the head's weight
      self.position_embedding = nn.Embedding(config.block_size, d)
      self.blocks = nn.ModuleList(Block(d, config.n_head) for _ in range(config.n_layer))
      self.norm = LayerNorm(d)
      for name, p in self.named_parameters():
        if p.dim() == 2:  # GPT-2: N(0, 0.02), the residual branches' outputs scaled by depth
          std = 0.02 / math.sqrt(2 * config.n_layer) if name.endswith(('attn_out.weight',
                                                                       'down.weight')) else 0.02
          nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx_BxL, targets_BxL):
      positions_L = torch.arange(idx_BxL.shape[1], device=idx_BxL.device)
      x_BxLxD = self.token_embedding(idx_BxL) + self.position_embedding(positions_L)
      for block in self.blocks:
        x_BxLxD = block(x_BxLxD)
      logits_BxLxV = F.linear(self.norm(x_BxLxD), self.token_embedding.weight)
      loss = F.cross_entropy(logits_BxLxV.flatten(0, 1), targets_BxL.flatten())
      return logits_BxLxV, loss

  return GPT


def adamw(model, config):
  """AdamW as nanoGPT's configure_optimizers: weight decay on the parameters of two or more
  dimensions (matmul weights and embeddings), none on the norms' gains. `optimizer` picks the
  implementation: 'default' is torch's choice for CPU tensors, which nanoGPT takes on a CPU (it
  asks for fused only on CUDA)."""
  torch = import_torch()
  params = [p for p in model.parameters() if p.requires_grad]
  groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': config.weight_decay},
            {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
  implementation = {'default': {}, 'foreach': {'foreach': True}, 'fused': {'fused': True}}
  return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, config.beta2),
                           **implementation[config.optimizer])


def check_config(config) -> None:
  from model.config import ConfigError
  choices = {'optimizer': ('default', 'foreach', 'fused'),
             'matmul_precision': ('highest', 'high', 'medium'),
             'omp_wait_policy': ('', 'passive', 'active')}
  for key, allowed in choices.items():
    if config[key] not in allowed:
      raise ConfigError(f'config.{key}={config[key]!r}: one of {allowed}')
  for key in ('threads', 'steps_per_timing', 'repeats', 'batch_size', 'block_size'):
    if config[key] < 1:
      raise ConfigError(f'config.{key}={config[key]} must be at least 1')


def train_steps(config):
  """(model, step): step() runs one training step as nanoGPT's train.py on a CPU does, with the
  harness's choices, and returns the loss tensor."""
  torch = import_torch()
  torch.set_num_threads(config.threads)
  torch.set_float32_matmul_precision(config.matmul_precision)
  model = gpt(config)
  model.train()
  optimizer = adamw(model, config)
  generator = torch.Generator().manual_seed(0)
  B, L = config.batch_size, config.block_size
  # A corpus of random tokens, 1,000 batches long, to draw from as train.py's get_batch does.
  tokens = torch.randint(config.vocab_size, (1000 * B * L,), generator=generator)

  def batch():
    starts = torch.randint(len(tokens) - L - 1, (B,), generator=generator).tolist()
    x_BxL = torch.stack([tokens[s:s + L] for s in starts])
    y_BxL = torch.stack([tokens[s + 1:s + 1 + L] for s in starts])
    return x_BxL, y_BxL

  fixed = batch()

  def step():
    x_BxL, y_BxL = batch() if config.sample_batches else fixed
    _, loss = model(x_BxL, y_BxL)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=config.set_to_none)
    if config.read_loss:
      loss.item()
    return loss

  return model, step


def measure(config) -> dict:
  """The peer's row: tokens/s at the median timing, and what was timed. `omp_wait_policy` counts
  only in a process that has not loaded PyTorch yet (OpenMP reads it once), as the commands'."""
  check_config(config)
  if config.omp_wait_policy:
    os.environ['OMP_WAIT_POLICY'] = config.omp_wait_policy
  torch = import_torch()
  model, step = train_steps(config)
  seconds, cpu_seconds = [], []
  for timing in range(config.warmup + config.repeats):
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(config.steps_per_timing):
      loss = step()
    if timing >= config.warmup:  # eager on a CPU: each op has finished when it returns
      seconds.append(time.perf_counter() - start)
      cpu_seconds.append(time.process_time() - cpu_start)
  step_s = float(np.median(seconds)) / config.steps_per_timing
  return {'model': 'nanoGPT model.py' if config.nanogpt_dir else 'nexttoken torch_gpt',
          'torch': torch.__version__, 'cpu_capability': torch.backends.cpu.get_cpu_capability(),
          'params': sum(p.numel() for p in model.parameters()),
          'tokens_per_s': config.batch_size * config.block_size / step_s,
          'step_ms': 1e3 * step_s, 'final_loss': float(loss.detach()),
          # The process's CPU time (all its threads, spinning included): what a step costs,
          # less sensitive than the wall time to other processes on the machine.
          'cpu_ms_per_step': 1e3 * float(np.median(cpu_seconds)) / config.steps_per_timing,
          'timings_ms_per_step': [1e3 * s / config.steps_per_timing for s in seconds],
          'harness': {k: config[k] for k in HARNESS_KEYS}}


HARNESS_KEYS = ('threads', 'omp_wait_policy', 'optimizer', 'set_to_none', 'sample_batches',
                'read_loss', 'matmul_precision', 'steps_per_timing', 'warmup', 'repeats',
                'nanogpt_dir')


def describe(row: dict) -> str:
  """One line: what was timed and how fast."""
  return (f'PyTorch {row["torch"]} ({row["cpu_capability"]}), {row["model"]}, '
          f'{row["params"]:,} parameters: {row["tokens_per_s"]:,.0f} tokens/s, '
          f'{row["step_ms"]:.2f} ms/step, {row["cpu_ms_per_step"]:.2f} CPU ms/step')


def main(argv):
  del argv
  workdir = flags.FLAGS.workdir
  row = measure(flags.FLAGS.config)
  print(describe(row))
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'torch_gpt.json'), 'w') as f:
    json.dump(row, f, indent=1)


if __name__ == '__main__':
  cli.command(main, 'Where torch_gpt.json is written.', config='pytorch_benchmark.py',
              makes='experiment', errors=(PeerMissing,))
