"""The device mesh (axes data, fsdp, tensor) and the one table mapping logical axis names to mesh axes.

Parameters carry logical axis names in their `logical_axes` metadata (model/layers.py); activations are
constrained with `constrain(x, layout)`, a layout being one of the named tuples ACT_* below. Changing a parallelism
strategy is an edit of LOGICAL_AXIS_RULES.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
from ml_collections import config_dict

from layerskip_jax.config import MESH_AXES
from layerskip_jax.errors import UsageError

BATCH = ('data', 'fsdp')  # the batch is split over every data-parallel axis

LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
  # parameters
  ('layers', None),  # the stacked-layer axis is never sharded (the scan walks it)
  ('vocab', 'tensor'),
  ('embed', 'fsdp'),
  ('q_heads', 'tensor'),  # flattened (heads * head_dim) output of the query projection
  ('kv_heads', 'tensor'),  # flattened (kv_heads * head_dim) output of the key/value projections
  ('mlp', 'tensor'),
  ('norm', None),
  # activations
  ('act_batch', BATCH),
  ('act_seq', None),
  ('act_embed', None),
  ('act_heads', 'tensor'),
  ('act_kv_heads', 'tensor'),
  ('act_mlp', 'tensor'),
  ('act_vocab', 'tensor'),
  ('act_head_dim', None),
)
_RULES = dict(LOGICAL_AXIS_RULES)

# Activation layouts: the logical names of an activation's axes, one name per layout (Flax Gemma's act_btd). Letters:
# B batch, T sequence, D embed (hidden), H query heads, K key/value heads, E head_dim, F mlp, V vocab, L layers.
ACT_BTD = ('act_batch', 'act_seq', 'act_embed')  # the residual stream
ACT_BTHE = ('act_batch', 'act_seq', 'act_heads', 'act_head_dim')  # queries
ACT_BTKE = ('act_batch', 'act_seq', 'act_kv_heads', 'act_head_dim')  # keys and values
ACT_BTF = ('act_batch', 'act_seq', 'act_mlp')  # the MLP's hidden activations
ACT_BTV = ('act_batch', 'act_seq', 'act_vocab')  # logits
ACT_LB = (None, 'act_batch')  # a per-layer, per-sequence mask (layer dropout)


def logical_to_spec(names: Sequence[str | None]) -> PartitionSpec:
  """PartitionSpec for a tuple of logical axis names; a mesh axis is used at most once."""
  used, spec = set(), []
  for name in names:
    if name is not None and name not in _RULES:
      raise KeyError(f'logical axis {name!r} has no rule in LOGICAL_AXIS_RULES')
    axes = _RULES.get(name) if name is not None else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if a not in used)
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*spec)


def _mesh_shape(sizes: dict[str, int], total: int, what: str) -> tuple[int, ...]:
  fixed = math.prod(v for v in sizes.values() if v != -1)
  if -1 in sizes.values():
    if total % fixed:
      raise UsageError(f'{what}: the fixed sizes {sizes} (product {fixed}) do not divide {total} devices')
    sizes = {k: (total // fixed if v == -1 else v) for k, v in sizes.items()}
  if math.prod(sizes.values()) != total:
    raise UsageError(
      f'{what}: sizes {sizes} multiply to {math.prod(sizes.values())}, but there are {total} devices;'
      ' make them multiply to the device count or set one axis to -1'
    )
  return tuple(sizes[a] for a in MESH_AXES)


def make_mesh(mesh_config: config_dict.ConfigDict | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A Mesh with axes (data, fsdp, tensor), Auto axis types, from the config's `mesh` section.

  Within-node sizes (data, fsdp, tensor) multiply the across-node sizes (dcn_*): with dcn sizes above 1 the device
  order keeps fast interconnect inside each node (mesh_utils.create_hybrid_device_mesh).
  """
  devices = list(devices if devices is not None else jax.devices())
  cfg = mesh_config or config_dict.ConfigDict(
    {'data': 1, 'fsdp': -1, 'tensor': 1, 'dcn_data': 1, 'dcn_fsdp': 1, 'dcn_tensor': 1}
  )
  dcn_sizes = {a: cfg[f'dcn_{a}'] for a in MESH_AXES}
  num_groups = len({getattr(d, 'slice_index', d.process_index) for d in devices})
  dcn = _mesh_shape(dcn_sizes, num_groups if -1 in dcn_sizes.values() else math.prod(dcn_sizes.values()), 'mesh.dcn_*')
  if len(devices) % math.prod(dcn):
    raise UsageError(f'mesh.dcn_*: sizes {dcn} do not divide {len(devices)} devices')
  ici = _mesh_shape({a: cfg[a] for a in MESH_AXES}, len(devices) // math.prod(dcn), 'mesh.data/fsdp/tensor')
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  if math.prod(dcn) == 1:
    return jax.make_mesh(ici, MESH_AXES, axis_types=axis_types, devices=devices)
  grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
  return Mesh(grid, MESH_AXES, axis_types=axis_types)


def single_device_mesh() -> Mesh:
  return jax.make_mesh((1, 1, 1), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=jax.devices()[:1])


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def param_specs(state: nnx.State) -> nnx.State:
  """The PartitionSpec of every Variable in `state`, from its `logical_axes` metadata (none: replicated)."""

  def spec(v):
    names = v.get_metadata().get('logical_axes') if _is_variable(v) else None
    return v.replace(logical_to_spec(names) if names else PartitionSpec()) if _is_variable(v) else PartitionSpec()

  return jax.tree.map(spec, state, is_leaf=_is_variable)


def param_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
  """NamedShardings for `state` (real or abstract, e.g. from nnx.eval_shape) on `mesh`."""
  specs = param_specs(state)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Sharding of a [batch, ...] input array: batch split over (data, fsdp), the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH, *([None] * (ndim - 1))))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """with_sharding_constraint by logical names, inside a mesh context (jax.set_mesh); a no-op outside one."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names))


def describe(mesh: Mesh) -> str:
  shape = ', '.join(f'{a}={s}' for a, s in mesh.shape.items())
  return f'mesh({shape}) over {mesh.devices.size} {np.asarray(mesh.devices).flat[0].platform} devices'
