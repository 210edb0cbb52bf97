"""Shapes for `python -m experiments.benchmark` (training speed, MFU, memory, decoding speed).

  python -m experiments.benchmark --workdir=runs/benchmark
  python -m experiments.benchmark --workdir=runs/benchmark --config.shapes=nanogpt_cpu
  python -m experiments.benchmark --workdir=runs/benchmark_quick \
      --config=experiments/configs/benchmark.py:quick   # 2 CPU shapes, 2 repeats
      # 115 s at a load of 4 (112 CPU s)

By default a CPU runs the `cpu` shapes and an accelerator the `accelerator` shapes; `shapes`
(comma-separated names) picks any. On the 2-core CPU the default set takes several minutes: the
uncached decoding baseline at 1024 tokens alone ran for minutes at a load average of 9.
"""

from ml_collections import ConfigDict

from experiments.configs import base

# nanoGPT's CPU recipe: 4 layers, width 128, 4 heads, context 64, batch 12, vocabulary 65; the
# SwiGLU width 344 keeps the parameter count of its GELU MLP of 512.
_NANOGPT = dict(d_model=128, num_heads=4, d_ff=344, pattern='attn*4', scan_layers=False,
                vocab_size=65)
# GPT-2 small: 12 layers, width 768, 12 heads; vocabulary padded to a multiple of 64.
_GPT2_SMALL = dict(d_model=768, num_heads=12, d_ff=2048, pattern='attn*12', vocab_size=50304,
                   dtype='bfloat16', attention_impl='cudnn', scan_layers=True)
# 8 experts, top-2, each half the dense width: the same active feed-forward FLOPs per token as
# the dense shape it replaces, four times its feed-forward parameters.
_MOE = dict(num_experts=8, top_k=2, capacity_factor=1.25)


def _model(base_shape: dict, moe_d_ff: int = 0, **overrides) -> ConfigDict:
  m = base.model_config(**{**base_shape, **overrides})
  if moe_d_ff:
    m.moe.update(_MOE, d_ff=moe_d_ff)
  return m


def _mamba2(model: ConfigDict, **mamba2) -> ConfigDict:
  model.mamba2.update(mamba2)
  return model


def _shape(model: ConfigDict, batch: int, seq_len: int, contexts=()) -> ConfigDict:
  """Decoding times 128 new tokens after a prompt of context - 128, for each context."""
  return ConfigDict(dict(model=model, batch_size=batch, seq_len=seq_len,
                         decode_contexts=contexts, decode_new_tokens=128))


def get_config(preset: str = '') -> ConfigDict:
  c = ConfigDict()
  c.shapes = ''             # comma-separated names; '' runs the set for this device's platform
  c.cpu = 'nanogpt_cpu,moe_cpu,mamba_cpu,mamba2_cpu'
  c.accelerator = 'gpt2_small,moe_gpt2_small,mamba_gpt2_small'
  c.steps_per_call = 10     # train steps per compiled call, as train.steps_per_call
  c.repeats = 5             # timed calls; the median is reported
  c.decode = True           # also time decoding at each shape's decode_contexts
  c.catalog = ConfigDict(dict(
      nanogpt_cpu=_shape(_model(_NANOGPT), batch=12, seq_len=64, contexts=(256, 1024)),
      moe_cpu=_shape(_model(_NANOGPT, moe_d_ff=172, pattern='attn:moe*4'), batch=12,
                     seq_len=64),
      # A Mamba block (no feed-forward) holds about half the parameters of an attention + MLP
      # block, so twice the layers match a transformer's size, as Gu & Dao compare them.
      # Decoding at 256 only: the uncached baseline's sequential scans take minutes at 1024.
      mamba_cpu=_shape(_model(_NANOGPT, pattern='mamba*8'), batch=12, seq_len=64,
                       contexts=(256,)),
      # Mamba-2 at mamba_cpu's width and depth: 4 heads of 64, N = 64, one chunk of 64 per
      # sequence (docs/mamba2.md).
      mamba2_cpu=_shape(_mamba2(_model(_NANOGPT, pattern='mamba2*8'), d_state=64), batch=12,
                        seq_len=64, contexts=(256,)),
      gpt2_small=_shape(_model(_GPT2_SMALL), batch=16, seq_len=1024, contexts=(1024,)),
      moe_gpt2_small=_shape(_model(_GPT2_SMALL, moe_d_ff=1024, pattern='attn:moe*12'),
                            batch=16, seq_len=1024),
      # Mamba-130M's shape (Gu & Dao 2023): 24 blocks of width 768.
      mamba_gpt2_small=_shape(_model(_GPT2_SMALL, pattern='mamba*24'), batch=16, seq_len=1024,
                              contexts=(1024,)),
  ))
  return base.with_preset(c, preset, quick={'cpu': 'nanogpt_cpu,mamba2_cpu', 'repeats': 2,
                                            'catalog.nanogpt_cpu.decode_contexts': (256,)})
