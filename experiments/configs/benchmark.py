"""Shapes for `python -m experiments.benchmark` (training speed, MFU, memory, decoding speed).

  python -m experiments.benchmark --workdir=runs/benchmark
  python -m experiments.benchmark --workdir=runs/benchmark --config.shapes=nanogpt_cpu

By default a CPU runs the `cpu` shapes and an accelerator the `accelerator` shapes; `shapes`
(comma-separated names) picks any. On the 2-core CPU the default set takes about two minutes.
"""

from ml_collections import ConfigDict

from experiments.configs import base

_NANOGPT = dict(d_model=128, num_heads=4, d_ff=344, pattern='attn*4', scan_layers=False,
                vocab_size=65)
_GPT2_SMALL = dict(d_model=768, num_heads=12, d_ff=2048, pattern='attn*12', vocab_size=50304,
                   dtype='bfloat16', attention_impl='cudnn', scan_layers=True)


def _shape(model: dict, batch: int, seq_len: int, **decode) -> ConfigDict:
  return ConfigDict(dict(model=base.model_config(**model), batch_size=batch, seq_len=seq_len,
                         decode_contexts=decode.get('contexts', ()),
                         decode_new_tokens=decode.get('new_tokens', 32)))


def get_config() -> ConfigDict:
  c = ConfigDict()
  c.shapes = ''             # comma-separated names; '' runs the set for this device's platform
  c.cpu = 'nanogpt_cpu'
  c.accelerator = 'gpt2_small'
  c.steps_per_call = 10     # train steps per compiled call, as train.steps_per_call
  c.repeats = 5             # timed calls; the median is reported
  c.catalog = ConfigDict(dict(
      # nanoGPT's CPU recipe shape: 4 layers, width 128, context 64, batch 12, vocabulary 65.
      nanogpt_cpu=_shape(_NANOGPT, batch=12, seq_len=64, contexts=(256, 1024), new_tokens=32),
      # GPT-2 small: 12 layers, width 768, context 1024 (vocabulary padded to a multiple of 64).
      gpt2_small=_shape(_GPT2_SMALL, batch=16, seq_len=1024, contexts=(1024,), new_tokens=64),
  ))
  return c
