"""The device mesh, the one table of rules that maps logical axis names onto it, and the multi-host
start-up.

Mesh axes: data (replicated parameters, split batch), fsdp (split batch and parameters), tensor
(split heads / MLP / vocabulary), expert (split experts). A config's `mesh` section gives their
sizes; -1 takes the remaining devices. One mesh of size 1 is a single device: there is no other
code path. Every parameter dimension a mesh axis splits must be divisible by that axis's size, and
every batch by the product of the batch axes: `check_params` and `check_batch` fail before
anything compiles, naming the mesh axis, the logical axis and the dimension (nothing is silently
replicated).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ('data', 'fsdp', 'tensor', 'expert')
BATCH_AXES = ('data', 'fsdp', 'expert')

# logical axis -> mesh axes. Parameters first, then activations.
RULES = (
    ('vocab', 'tensor'),
    ('embed', 'fsdp'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('kv', None),
    ('mlp', 'tensor'),
    ('exp', 'expert'),
    ('norm', None),
    ('position', None),
    ('layers', None),
    ('ssm_inner', 'tensor'),
    ('ssm_state', None),
    ('ssm_rank', None),
    ('conv', None),
    ('ssm_heads', 'tensor'),
    ('ssm_head_dim', None),
    ('ssm_groups', None),
    ('activation_batch', BATCH_AXES),
    ('activation_length', None),
    ('activation_embed', None),
    ('activation_heads', 'tensor'),
    ('activation_kv', None),
    ('activation_mlp', 'tensor'),
    ('activation_vocab', 'tensor'),
    ('activation_exp', 'expert'),
)

# What to change when a mesh axis does not divide a parameter dimension, by logical axis.
_FIXES = {
    'vocab': 'set model.vocab_size to a multiple of {n} (it may exceed the tokenizer\'s)',
    'embed': 'make model.d_model a multiple of {n}',
    'heads': 'make model.num_heads a multiple of {n}',
    'kv_heads': 'make model.num_kv_heads (by default model.num_heads) a multiple of {n}',
    'mlp': 'make the feed-forward width (model.d_ff, or model.moe.d_ff) a multiple of {n}',
    'exp': 'make model.moe.num_experts a multiple of {n}',
    'ssm_inner': 'make model.mamba.expand * model.d_model a multiple of {n}',
    'ssm_heads': 'make the Mamba-2 heads (model.mamba2.expand * model.d_model / '
                 'model.mamba2.head_dim) a multiple of {n}',
}


class MeshError(ValueError):
  """A mesh that does not fit the devices or the model; the message names the axis."""


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
  sizes = [int(mesh_cfg[a]) for a in AXES]
  if sizes.count(-1) > 1:
    raise MeshError(f'at most one mesh axis may be -1, got {dict(zip(AXES, sizes))}')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise MeshError(f'the mesh axes {dict(zip(AXES, sizes))} do not divide the '
                      f'{num_devices} devices')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise MeshError(f'the mesh {dict(zip(AXES, sizes))} has {math.prod(sizes)} devices but '
                    f'{num_devices} are present; make the product of config.mesh equal the '
                    f'device count (or set one axis to -1)')
  return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  devices = devices if devices is not None else jax.devices()
  # Auto axes: GSPMD propagates shardings from the parameters, batches and logical constraints
  # (JAX's default for make_mesh is Explicit sharding-in-types, which this code does not use).
  return jax.make_mesh(mesh_shape(mesh_cfg, len(devices)), AXES,
                       axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def logical_shardings(boxed_tree, mesh: Mesh):
  """NamedShardings for a tree of flax LogicallyPartitioned leaves (abstract or concrete)."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, RULES)


def batch_sharding(mesh: Mesh, leading_axes: int = 0) -> NamedSharding:
  """Batch arrays (B, ...) split over the batch axes along B, any trailing axes whole;
  `leading_axes` unsplit axes come first (steps)."""
  return NamedSharding(mesh, P(*([None] * leading_axes), BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_shards(mesh) -> int:
  """How many ways a batch is split: the product of the batch axes' sizes."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


# ---------------------------------------------------------------------------------------------
# Checks that run before compiling: a dimension an axis does not divide fails here, by name.


def _axes_size(mesh, axes) -> tuple[tuple[str, ...], str, int]:
  """(('tensor',), 'tensor=8', 8) for one mesh axis, (..., 'data=2 x fsdp=4', 8) for several."""
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  return (axes, ' x '.join(f'{a}={mesh.shape[a]}' for a in axes),
          math.prod(mesh.shape[a] for a in axes))


def check_params(boxed_params, mesh) -> None:
  """Raises MeshError for the first parameter dimension that its mesh axes do not divide.

  `boxed_params`: the parameters as `model.init` returns them (boxed with logical axis names;
  abstract is enough). `mesh`: a Mesh or AbstractMesh."""
  leaves = jax.tree_util.tree_flatten_with_path(
      boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
  for path, leaf in leaves:
    if not isinstance(leaf, nn.Partitioned):
      continue
    spec = nn.logical_to_mesh_axes(leaf.names, RULES)
    for dim, (size, logical, axes) in enumerate(zip(leaf.value.shape, leaf.names, spec)):
      if axes is None:
        continue
      names, label, n = _axes_size(mesh, axes)
      if size % n:
        name = '/'.join(str(getattr(k, 'key', k)) for k in path)
        fix = _FIXES.get(logical, 'change that dimension to a multiple of {n}').format(n=n)
        raise MeshError(
            f'the mesh axis {label} does not divide dimension {dim} of parameter {name} '
            f'(logical axis {logical!r}, size {size}); {fix}, or set config.mesh.'
            f'{" x ".join(names)} to a divisor of {size}')


def check_batch(batch_size: int, mesh, field: str) -> None:
  """Raises MeshError unless `batch_size` rows split evenly over the mesh's batch axes."""
  _, label, n = _axes_size(mesh, BATCH_AXES)
  if batch_size % n:
    raise MeshError(
        f'{field}={batch_size} is not divisible by the {n} batch shards of the mesh ({label}, '
        f'the mesh axes of the logical axis activation_batch); make it a multiple of {n} or '
        f'change config.mesh')


# ---------------------------------------------------------------------------------------------
# Running on the mesh.


@contextlib.contextmanager
def activate(mesh: Mesh):
  """The mesh and the rules in context: the model's `nn.with_logical_constraint` calls, no-ops
  elsewhere, constrain its activations while a function traces inside."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    yield


def jit(fn, mesh: Mesh, **jit_kwargs):
  """`jax.jit(fn, **jit_kwargs)` that traces with the mesh and the rules active; its `lower`
  too (to compile ahead of the first call)."""
  jitted = jax.jit(fn, **jit_kwargs)

  @functools.wraps(fn)
  def call(*args):
    with activate(mesh):
      return jitted(*args)

  def lower(*args):
    with activate(mesh):
      return jitted.lower(*args)

  call.lower = lower
  return call


def put_batch(batch: dict, sharding) -> dict:
  """This process's rows of a global batch -> global arrays laid out by `sharding`."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def process_batch_block(mesh: Mesh) -> tuple[int, int]:
  """(index, count): this process holds rows [index * B / count, (index + 1) * B / count) of every
  global batch of B rows. Processes whose devices differ only along non-batch axes (tensor)
  hold the same block; on one process it is (0, 1)."""
  shards = batch_shards(mesh)
  # A probe batch of one row per batch shard: each device's slice names the shard it holds.
  indices = batch_sharding(mesh).addressable_devices_indices_map((shards, 1))
  rows = sorted({index[0].start or 0 for index in indices.values()})
  if rows != list(range(rows[0], rows[0] + len(rows))) or rows[0] % len(rows):
    raise MeshError(f'the batch shards of this process ({rows} of {shards}) are not one '
                    f'contiguous block of the mesh {dict(mesh.shape)}; order the mesh axes so '
                    f'that each host holds whole batch blocks')
  return rows[0] // len(rows), shards // len(rows)


# ---------------------------------------------------------------------------------------------
# Multi-host start-up.

# XLA's CPU flags that every benchmark shape trained faster with (BENCHMARKS.md, "XLA CPU flags"):
# the matmuls go to XLA's own dot emitter (Eigen) instead of YNNPACK fusions, 1.08-1.2x.
CPU_XLA_FLAGS = ('--xla_cpu_experimental_ynn_fusion_type=',)


def prepare_backend(environ=os.environ) -> None:
  """What every command does before anything creates a JAX backend: CPU_XLA_FLAGS join XLA_FLAGS
  (a flag the user's XLA_FLAGS already sets keeps the user's value), and `skip_absent_tpu`."""
  given = environ.get('XLA_FLAGS', '')
  for flag in CPU_XLA_FLAGS:
    if flag.split('=')[0] + '=' not in given:
      given = f'{given} {flag}'.strip()
  environ['XLA_FLAGS'] = given
  skip_absent_tpu(environ)


def skip_absent_tpu(environ=os.environ) -> bool:
  """Keeps JAX from starting a TPU backend where no TPU is attached but libtpu is installed (for
  --compile_for); returns whether it did. JAX skips CUDA where no GPU is visible but tries TPU
  whenever libtpu is installed: the attempt fails after libtpu prints errors about the missing TPU
  metadata, at every start-up (jax-ml/jax#11668). At import, JAX sets `jax_platforms` to
  'tpu,cpu' when it finds TPU chips; when it found none, nothing else chose the platforms
  (JAX_PLATFORMS) and no other accelerator plugin is installed, the CPU is all JAX could start,
  and this says so. Call it before anything creates a JAX backend."""
  import importlib.metadata
  import importlib.util
  libtpu = environ.get('TPU_LIBRARY_PATH') or importlib.util.find_spec('libtpu')
  others = (importlib.util.find_spec('jax_plugins')
            or list(importlib.metadata.entry_points(group='jax_plugins')))
  if (not libtpu or jax.config.jax_platforms or others or 'JAX_FORCE_TPU_INIT' in environ):
    return False
  jax.config.update('jax_platforms', 'cpu')
  return True


# Environment variables in which launchers give the number of processes they started.
_PROCESS_COUNTS = ('JAX_NUM_PROCESSES', 'SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE')


def launched_as_several(environ=os.environ) -> bool:
  """Whether the environment says this process is one of several: JAX's coordinator variable,
  a launcher's process count above 1 (JAX_NUM_PROCESSES, Slurm, Open MPI), or a TPU slice
  whose worker list (TPU_WORKER_HOSTNAMES, set on GKE) names several hosts."""
  if environ.get('JAX_COORDINATOR_ADDRESS'):
    return True
  if any(int(environ.get(k) or 1) > 1 for k in _PROCESS_COUNTS):
    return True
  return len((environ.get('TPU_WORKER_HOSTNAMES') or '').split(',')) > 1


def initialize_distributed(mode: str = 'auto', coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           environ=os.environ) -> bool:
  """Starts `jax.distributed` (it must run before anything creates a JAX backend); returns
  whether it did. mode 'on' always starts it, 'off' never, 'auto' when a coordinator or several
  processes are given here or by the environment (`launched_as_several`). Values not given come
  from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, else from JAX's cluster
  detection (Cloud TPU metadata, Slurm, Open MPI). On CPU, processes talk through gloo."""
  if mode not in ('auto', 'on', 'off'):
    raise MeshError(f'--distributed={mode!r} is not known; choose auto, on or off')
  num_processes = num_processes or _int_or_none(environ.get('JAX_NUM_PROCESSES'))
  if process_id is None:
    process_id = _int_or_none(environ.get('JAX_PROCESS_ID'))
  wanted = mode == 'on' or (mode == 'auto' and (
      bool(coordinator_address) or (num_processes or 1) > 1 or launched_as_several(environ)))
  if wanted:
    try:
      jax.distributed.initialize(coordinator_address or None, num_processes, process_id)
    except ValueError as e:  # nothing given and no cluster detected
      raise MeshError(f'jax.distributed cannot start: {e} Outside Cloud TPU, Slurm and Open MPI, '
                      f'give --coordinator_address=HOST:PORT of process 0, --num_processes and '
                      f'--process_id (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and '
                      f'JAX_PROCESS_ID)') from e
  return wanted


def _int_or_none(value: str | None) -> int | None:
  return int(value) if value else None
