"""Device mesh and logical-axis sharding rules (flax examples/lm1b style).

Parameters carry logical axis names (layers.py); `mesh.rules` maps them to mesh axes. The default mesh is pure
data parallelism: batch over 'data', parameters replicated. Setting `mesh.model > 1` shards heads, MLP and
vocabulary over 'model' (tensor parallelism); `mesh.fsdp > 1` shards the embed axis of parameters.
"""
from __future__ import annotations

from typing import Any, Sequence, Tuple

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

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

  A dimension that the mesh axes do not divide evenly (say a 65-character vocabulary over model=2) stays
  replicated instead of failing: correct, just less sharded.
  """
  specs = nn.get_partition_spec(boxed_tree)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  shapes = nn.unbox(boxed_tree)
  return jax.tree.map(lambda sh, x: _divisible(sh, x.shape, mesh), shardings, shapes)


def _divisible(named: NamedSharding, shape, mesh: Mesh) -> NamedSharding:
  spec = []
  for dim, axes in zip(shape, tuple(named.spec) + (None,) * (len(shape) - len(named.spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    ways = int(np.prod([mesh.shape[a] for a in names])) if names else 1
    spec.append(axes if dim % ways == 0 else None)
  return NamedSharding(mesh, P(*spec))


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
