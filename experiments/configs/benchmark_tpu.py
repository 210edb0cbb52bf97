"""Runs for `python -m experiments.benchmark.tpu`: each compiled ahead of time for a real TPU slice
on this CPU (train/compile_for.py, libtpu), in one table of memory per chip, fit, estimated MFU and
collectives (BENCHMARKS.md, "Accelerators: TPU, compiled ahead of time").

  python -m experiments.benchmark.tpu --workdir=runs/benchmark_tpu
  python -m experiments.benchmark.tpu --workdir=DIR --config.cases=gpt2_small_v5p,moe_v5p

The shapes are experiments/configs/benchmark.py's (nanoGPT's; GPT-2 small and its MoE and Mamba
versions, with XLA attention), on a v5e and a v5p slice each. A GPT-2-sized train step takes 1-4
minutes to compile on a 2-core CPU. (The scaling sweep's runs are checked by its own dry run:
`python -m experiments.scaling --config=experiments/configs/scaling_tpu.py --dry_run
--compile_for=...`.)
"""

from ml_collections import ConfigDict

from experiments.configs import base


def _case(shape: str, topology: str, batch_size: int, **mesh) -> ConfigDict:
  """`shape`: a name in benchmark.py's catalog; the mesh axes not given are 1."""
  return ConfigDict(dict(shape=shape, topology=topology, batch_size=batch_size,
                         mesh=dict(dict(data=1, fsdp=1, tensor=1, expert=1), **mesh)))


def get_config(preset: str = '') -> ConfigDict:
  c = ConfigDict()
  c.cases = ''           # comma-separated names; '' compiles them all
  c.steps_per_call = 10  # train steps per compiled call, as train.steps_per_call
  c.catalog = ConfigDict(dict(
      nanogpt_v5e=_case('nanogpt_cpu', 'v5e:2x2', 12, data=4),
      nanogpt_v5p=_case('nanogpt_cpu', 'v5p:2x2x1', 12, data=4),
      gpt2_small_v5e=_case('gpt2_small', 'v5e:4x4', 64, data=4, fsdp=4),
      gpt2_small_v5p=_case('gpt2_small', 'v5p:2x2x2', 64, data=2, fsdp=4),
      # 8 experts, one a chip along the expert axis.
      moe_v5e=_case('moe_gpt2_small', 'v5e:4x4', 64, data=2, expert=8),
      moe_v5p=_case('moe_gpt2_small', 'v5p:2x2x2', 64, expert=8),
      mamba_v5e=_case('mamba_gpt2_small', 'v5e:4x4', 64, data=4, fsdp=4),
      mamba_v5p=_case('mamba_gpt2_small', 'v5p:2x2x2', 64, data=2, fsdp=4),
  ))
  return base.with_preset(c, preset)  # no quick preset: each compile takes minutes
