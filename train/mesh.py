"""The device mesh and the one table of rules that maps logical axis names onto it.

Mesh axes: data (replicated parameters, split batch), fsdp (split batch and parameters), tensor
(split heads / MLP / vocabulary), expert (split experts). A config's `mesh` section gives their
sizes; -1 takes the remaining devices.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
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
    ('activation_batch', BATCH_AXES),
    ('activation_length', None),
    ('activation_embed', None),
    ('activation_heads', 'tensor'),
    ('activation_kv', None),
    ('activation_mlp', 'tensor'),
    ('activation_vocab', 'tensor'),
    ('activation_exp', 'expert'),
)


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
  """Batches (B, L) split over the batch axes; `leading_axes` unsplit axes come first (steps)."""
  return NamedSharding(mesh, P(*([None] * leading_axes), BATCH_AXES, None))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_shards(mesh: Mesh) -> int:
  """How many ways a batch is split: the product of the batch axes' sizes."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)
