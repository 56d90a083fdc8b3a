"""Device mesh and logical-axis sharding rules (flax examples/lm1b style).

Parameters carry logical axis names (layers.py); `mesh.rules` maps them to mesh axes. The default mesh is pure
data parallelism: batch over 'data', parameters replicated. Setting `mesh.model > 1` shards heads, MLP and
vocabulary over 'model' (tensor parallelism); `mesh.fsdp > 1` shards the embed axis of parameters.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any, Sequence, Tuple

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "model")

DEFAULT_RULES: Tuple[Tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", "model"),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("head_dim", None),
    ("layers", None),
)


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Mesh with axes (data, fsdp, model); one axis may be -1 to take the remaining devices."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = [int(mesh_cfg.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"only one of mesh.{MESH_AXES} may be -1, got {dict(zip(MESH_AXES, sizes))}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices cannot be split into mesh {dict(zip(MESH_AXES, sizes))}")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                     f"but {len(devices)} are available")
  # Auto axis types: Explicit (the make_mesh default) breaks nn.Embed's gather.
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def rules_from_config(mesh_cfg) -> Tuple[Tuple[str, Any], ...]:
  extra = mesh_cfg.get("rules", None)
  return tuple(tuple(r) for r in extra) if extra else DEFAULT_RULES


def logical_shardings(boxed_tree, mesh: Mesh, rules) -> Any:
  """NamedShardings for a tree whose leaves may be nn.LogicallyPartitioned (others are replicated).

  Optimizer states inherit their parameter's box; a state of another shape follows the axes it keeps
  (Adafactor's factored statistics drop one of the parameter's two largest axes) or, for placeholders, is
  replicated. A dimension that the mesh axes do not divide evenly (say a 65-character vocabulary over model=2)
  stays replicated instead of failing, with a warning naming the parameter.
  """
  param_shapes = {}
  if hasattr(boxed_tree, "params"):
    for path, leaf in jax.tree_util.tree_flatten_with_path(
        boxed_tree.params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]:
      param_shapes[_param_path(path)] = tuple(getattr(leaf, "value", leaf).shape)
  dropped = {}

  def one(path, leaf):
    if not isinstance(leaf, nn.LogicallyPartitioned):
      return NamedSharding(mesh, P())
    if not hasattr(leaf.value, "shape"):  # a box around an empty node (optax.MaskedNode in Muon's AdamW half)
      return leaf.value
    shape, where = tuple(leaf.value.shape), _param_path(path)
    names = _state_names(where, tuple(leaf.names), shape, param_shapes)
    spec, undivided = _spec(shape, names, rules, mesh)
    if undivided and (where.startswith("params/") or not param_shapes):  # one warning per parameter
      dropped.setdefault(where, undivided)
    return NamedSharding(mesh, spec)

  shardings = jax.tree_util.tree_map_with_path(one, boxed_tree,
                                               is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  for where, (dim, axes) in sorted(dropped.items()):
    log.warning("sharding: %s has a dimension of %d that mesh axes %s (%d ways) do not divide; it is replicated "
                "along them instead", where, dim, "x".join(axes), int(np.prod([mesh.shape[a] for a in axes])))
  return shardings


def _state_names(where: str, names: tuple, shape: tuple, param_shapes) -> tuple:
  """The logical names of an array boxed with its parameter's `names`: the parameter's own, or for an optimizer
  state of another shape the names of the axes it keeps (found by deleting the parameter axis it lacks)."""
  if len(names) == len(shape) and (where.startswith("params/") or not param_shapes):
    return names
  matches = [p for p in param_shapes if where.endswith("/" + p)]
  param = param_shapes[max(matches, key=len)] if matches else None
  if param is None or len(param) != len(names):
    return names if len(names) == len(shape) else (None,) * len(shape)
  if tuple(param) == shape:
    return names
  # Adafactor's v_row / v_col: the parameter minus its largest axis (v_row; the last of equal sizes) or minus
  # its second largest (v_col; the first of equal sizes), optax's factored_dims.
  axes = [a for a in range(len(param)) if param[:a] + param[a + 1:] == shape]
  if axes:
    axis = axes[-1] if "/v_row/" in where else axes[0]
    return names[:axis] + names[axis + 1:]
  return (None,) * len(shape)  # a placeholder ((1,)-shaped unfactored statistics) or anything else


def _spec(shape: tuple, names: tuple, rules, mesh: Mesh):
  """(PartitionSpec, (dim, axes) of the first dimension left replicated because its axes do not divide it, or
  None) for an array of `shape` whose dimensions have the logical `names`."""
  spec, undivided = [], None
  for dim, axes in zip(shape, _mesh_axes(names, rules, mesh)):
    ways = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    if dim % ways:
      undivided = undivided or (dim, axes)
      axes = ()
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*spec), undivided


def _mesh_axes(names: tuple, rules, mesh: Mesh) -> list:
  """Mesh axes (a tuple, possibly empty) per logical name: the first rule whose axes this array does not use yet."""
  used, out = set(), []
  for name in names:
    chosen = ()
    for logical, axes in rules:
      if logical != name:
        continue
      axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
      if not used & set(axes):
        chosen = tuple(a for a in axes if a in mesh.shape)
        break
    used |= set(chosen)
    out.append(chosen)
  return out


def _param_path(path) -> str:
  parts = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
  return "/".join(parts)


# --------------------------------------------------------------------------------------------- activations
# Set while a step is traced (activation_sharding); `constrain` reads it. Outside it (generation, scoring, tests
# of the model alone) constraints are no-ops, so the model code needs no mesh argument.
_ACTIVATIONS: list = []


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules):
  """Within this context, tracing a model pins its activations (`constrain`) to `mesh` by logical names.

  Wrap the traced function's body, not the call of a jitted one: the constraints are fixed when it is traced."""
  _ACTIVATIONS.append((mesh, rules))
  try:
    yield
  finally:
    _ACTIVATIONS.pop()


@contextlib.contextmanager
def no_activation_sharding():
  """Within this context `constrain` is a no-op again: inside a shard_map, whose arrays are each device's own."""
  _ACTIVATIONS.append(None)
  try:
    yield
  finally:
    _ACTIVATIONS.pop()


def tracing_with_activation_sharding(fn, mesh: Mesh, rules):
  """fn, traced inside activation_sharding(mesh, rules) (what to hand to jax.jit)."""
  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with activation_sharding(mesh, rules):
      return fn(*args, **kwargs)
  return traced


def active_mesh():
  """(mesh, rules) of the innermost activation_sharding context, or None outside one (or on one device)."""
  if not _ACTIVATIONS or _ACTIVATIONS[-1] is None or _ACTIVATIONS[-1][0].size == 1:
    return None
  return _ACTIVATIONS[-1]


def spec_for(shape: tuple, names: tuple, mesh: Mesh, rules) -> P:
  """The PartitionSpec of an array of `shape` with logical `names` (an axis the mesh does not divide: replicated)."""
  return _spec(tuple(shape), tuple(names), rules, mesh)[0]


def constrain(x: jax.Array, names: tuple) -> jax.Array:
  """x with a sharding constraint from its dimensions' logical names (e.g. ("batch", "activation_length",
  "vocab") for logits): the residual stream stays batch-sharded and model-parallel logits stay split over the
  vocabulary instead of being gathered. A dimension the mesh axes do not divide is left replicated."""
  active = active_mesh()
  if active is None:
    return x
  mesh, rules = active
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec_for(x.shape, names, mesh, rules)))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(("data", "fsdp")))


def microbatch_sharding(mesh: Mesh) -> NamedSharding:
  """[grad_accum, batch / grad_accum, ...] microbatches: the second axis sharded as the batch is."""
  return NamedSharding(mesh, P(None, ("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_divisible(batch_size: int, mesh: Mesh, field: str = "train.batch_size") -> None:
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % shards:
    raise ValueError(f"{field}={batch_size} is not divisible by the {shards} data-parallel shards of "
                     f"mesh {dict(mesh.shape)}; pick a multiple of {shards} or change mesh.data")


def check_microbatch_divisible(batch_size: int, grad_accum: int, mesh: Mesh) -> None:
  """Each microbatch is spread over every data shard (steps.split_microbatches), so it must divide evenly."""
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % grad_accum or (batch_size // grad_accum) % shards:
    raise ValueError(f"train.batch_size={batch_size} / opt.grad_accum={grad_accum} must be a whole multiple of the "
                     f"{shards} data-parallel shards of mesh {dict(mesh.shape)} (every device computes an equal "
                     f"share of every microbatch); pick a batch size that is a multiple of {grad_accum * shards}")


def process_rows(batch_sh: NamedSharding, batch_size: int) -> np.ndarray | None:
  """Sorted rows of a [batch_size, ...] global batch that this process's devices hold; None when it holds all
  (one process, or the batch replicated across processes). What each process's data pipeline reads, in the order
  `jax.make_array_from_process_local_data` expects."""
  rows = set()
  for index in batch_sh.addressable_devices_indices_map((batch_size,)).values():
    rows.update(range(batch_size)[index[0]])
  return None if len(rows) == batch_size else np.asarray(sorted(rows), np.int64)


def global_batch(batch: dict, batch_sh: NamedSharding, batch_size: int) -> dict:
  """Process-local numpy rows -> global jax arrays of `batch_size` rows, sharded by `batch_sh`."""
  if jax.process_count() == 1:
    return {k: jax.device_put(np.asarray(v), batch_sh) for k, v in batch.items()}
  return {k: jax.make_array_from_process_local_data(batch_sh, np.asarray(v), (batch_size,) + np.shape(v)[1:])
          for k, v in batch.items()}


def chunk_sharding(batch_sh: NamedSharding) -> NamedSharding:
  """The sharding of K global batches stacked as [K, batch, ...]: each batch sharded as `batch_sh` shards it."""
  return NamedSharding(batch_sh.mesh, P(None, *batch_sh.spec))


def global_chunk(batches: list, chunk_sh: NamedSharding, batch_size: int) -> dict:
  """K process-local batches (numpy rows, as global_batch takes them) -> global [K, batch_size, ...] jax arrays
  sharded by `chunk_sh`, placed with one transfer per key."""
  stacked = {k: np.stack([np.asarray(b[k]) for b in batches]) for k in batches[0]}
  if jax.process_count() == 1:
    return jax.device_put(stacked, chunk_sh)
  return {k: jax.make_array_from_process_local_data(chunk_sh, v, (len(batches), batch_size) + v.shape[2:])
          for k, v in stacked.items()}
