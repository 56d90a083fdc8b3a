"""A family's tensors described once: which torch key holds which jaxlm parameter, and how.

A table is a list of Rows (a tensor stored once) and Layers (rows repeated for each layer). A Row pairs a torch key
with a jaxlm path through a Transform, a pair of exact inverses (to_jax, to_torch) that may use the model's sizes
(head counts, ...), and gives the shape of its torch tensor. The schema (key -> shape, in state_dict order), the
reader and the writer all come from the same rows. Mappings that are not one tensor to one tensor are several rows:

  chunk=(c, C)     the row's torch tensor is piece c of C equal pieces along the first axis of the stored one
                   (HROM's fused qkv [q | k | v]: three rows on one key, one per jaxlm projection);
  slot=(axis, s)   the row's jaxlm array is index s of `axis` of the stored one (a gated MLP's value and gate
                   weights stacked into the wi kernel [D, 2, F]: one row per torch tensor);
  jax=None         a torch buffer jaxlm does not keep (a RoPE table): written from the sizes, read by the family;
  a second row on a path already mapped (a tied lm_head copy): written as a copy, and on read it must be equal.

Chunks and slots compose: YingGem's mlp.0.proj.weight [2F, D] = [value | gate] is two rows, each a chunk and a slot.
Layers rows have templated prefixes: per-block jaxlm paths ('layers_{i}/...'), or with stacked=True the nn.scan
layout ('layers/block/...', a leading layer axis) read and written directly.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from convert.errors import ConversionError

Sizes = Mapping[str, Any]  # "d": 512, "n": 8, ... and flags ("attn_bias": True) and computed buffers ("inv_freq")


@dataclasses.dataclass(frozen=True)
class Transform:
  """to_jax(torch array, sizes) -> jaxlm array and its exact inverse to_torch."""
  to_jax: Callable[[np.ndarray, Sizes], np.ndarray]
  to_torch: Callable[[np.ndarray, Sizes], np.ndarray]


def _c(x: np.ndarray) -> np.ndarray:
  """C order: a transposed result is copied into row-major memory (what the writers and jaxlm expect)."""
  return np.ascontiguousarray(x)


# torch nn.Linear stores weight [out, in]; jaxlm's DenseGeneral kernels are [in, ...out axes], attention splitting the
# out axis into heads: query/key/value kernel [D, heads, head_dim], output kernel [heads, head_dim, D].
COPY = Transform(lambda x, s: x, lambda x, s: x)
LINEAR = Transform(lambda w, s: _c(w.T), lambda k, s: _c(k.T))                   # [out, in] <-> kernel [in, out]
FLAT = Transform(lambda x, s: x.reshape(-1), lambda x, s: x.reshape(1, 1, -1))  # HRM's z0 [1, 1, D] <-> [D]


def heads_in(heads: str) -> Transform:
  """q/k/v weight [heads*head_dim, D] <-> kernel [D, heads, head_dim]; `heads` names a size."""
  return Transform(lambda w, s: _c(w.T.reshape(w.shape[1], s[heads], -1)), lambda k, s: _c(k.reshape(k.shape[0], -1).T))


def heads_bias(heads: str) -> Transform:
  """q/k/v bias [heads*head_dim] <-> [heads, head_dim]."""
  return Transform(lambda b, s: _c(b.reshape(s[heads], -1)), lambda b, s: _c(b.reshape(-1)))


def heads_out(heads: str) -> Transform:
  """output weight [D, heads*head_dim] <-> kernel [heads, head_dim, D]."""
  return Transform(lambda w, s: _c(w.T.reshape(s[heads], -1, w.shape[0])),
                   lambda k, s: _c(k.reshape(-1, k.shape[-1]).T))


def permuted(inner: Transform, perm: str) -> Transform:
  """`inner` whose jaxlm head_dim axis (the last) is sizes[perm]-permuted in torch; no permutation when it is None.
  Llama's export writes interleaved-RoPE q/k with pairs (2i, 2i+1) moved to (i, i + hd/2) for rotate-half."""
  def to_jax(x, s):
    y = inner.to_jax(x, s)
    return y if s.get(perm) is None else np.ascontiguousarray(y[..., np.argsort(s[perm])])

  def to_torch(y, s):
    return inner.to_torch(y if s.get(perm) is None else y[..., s[perm]], s)
  return Transform(to_jax, to_torch)


def buffer(name: str) -> Transform:
  """A torch buffer with no jaxlm parameter: written as sizes[name] (read: the family checks it)."""
  return Transform(lambda x, s: None, lambda x, s: s[name].copy())


@dataclasses.dataclass(frozen=True)
class Row:
  torch: str                     # key (inside Layers: relative to its torch prefix)
  jax: Optional[str]             # path (inside Layers: relative to its jaxlm prefix); None: a buffer
  transform: Transform
  shape: str                     # torch shape of the row's piece: "k*hd,d", "hd/2" over sizes names
  chunk: Tuple[int, int] = (0, 1)
  slot: Optional[Tuple[int, int]] = None
  when: Optional[str] = None     # a sizes flag: the row exists only when it is true

  def exists(self, sizes: Sizes) -> bool:
    return self.when is None or bool(sizes[self.when])

  def piece_shape(self, sizes: Sizes) -> Tuple[int, ...]:
    return tuple(_dim(dim, sizes) for dim in self.shape.split(","))


def _dim(expr: str, sizes: Sizes) -> int:
  """'k*hd' -> sizes['k'] * sizes['hd']; a factor may be a number and end in '/m' (integer division)."""
  value = 1
  for factor in expr.strip().split("*"):
    name, _, divisor = factor.partition("/")
    value *= (int(name) if name.isdigit() else int(sizes[name])) // int(divisor or 1)
  return value


@dataclasses.dataclass(frozen=True)
class Layers:
  """Rows repeated for i in range(sizes[count]), under templated prefixes."""
  torch: str                             # "block.{i}."
  rows: Tuple[Row, ...]
  count: str = "n_layers"                # the sizes name of the layer count
  per_block: str = "layers_{i}/"
  stacked: str = "layers/block/"         # the nn.scan layout (jaxlm.models.layout), a leading axis over i


def dense(module: str, path: str, kernel: Transform, bias: Optional[Transform], shape: str,
          has_bias: Union[bool, str] = True, chunk: Tuple[int, int] = (0, 1), slot: Optional[int] = None):
  """A torch Linear (`module`.weight [out, in], then .bias [out]) and a jaxlm DenseGeneral (`path`/kernel, /bias).
  has_bias: a sizes flag name when the bias is optional. slot: index s of a stacked kernel's axis 1 (the gated
  MLP's wi [D, 2, F]: 0 value, 1 gate), so axis 0 of its bias [2, F]."""
  rows = [Row(f"{module}.weight", f"{path}/kernel", kernel, shape, chunk, None if slot is None else (1, slot))]
  if has_bias:
    rows.append(Row(f"{module}.bias", f"{path}/bias", bias, shape.split(",")[0], chunk,
                    None if slot is None else (0, slot), has_bias if isinstance(has_bias, str) else None))
  return tuple(rows)


def chunked(module: str, parts: Sequence[Union[str, Tuple[str, int]]], kernel: Transform,
            bias: Optional[Transform], shape: str, has_bias: Union[bool, str] = True):
  """A torch Linear whose output rows are len(parts) equal pieces, each a jaxlm DenseGeneral path, or
  (path, s): slot s of one (HROM's qkv [q | k | v]; a gated MLP's [value | gate])."""
  rows = ()
  for c, part in enumerate(parts):
    path, slot = part if isinstance(part, tuple) else (part, None)
    rows += dense(module, path, kernel, bias, shape, has_bias, (c, len(parts)), slot)
  return rows


def norm(module: str, path: str, has_bias: bool = False):
  """A torch LayerNorm/RMSNorm (.weight [, .bias]) and a jaxlm norm (scale [, bias])."""
  rows = (Row(f"{module}.weight", f"{path}/scale", COPY, "d"),)
  return rows + (Row(f"{module}.bias", f"{path}/bias", COPY, "d"),) if has_bias else rows


def decoder_sizes(model: Mapping[str, Any], **extra) -> Dict[str, Any]:
  """The sizes and flags decoder tables use, from a jaxlm decoder's model dict (head_dim, n_kv_heads resolved)."""
  d, n = model["d_model"], model["n_heads"]
  return {"v": model["vocab_size"], "d": d, "n": n, "k": model.get("n_kv_heads") or n,
          "hd": model.get("head_dim") or d // n, "f": model["d_ff"], "n_layers": model["n_layers"],
          "attn_bias": model["attn_bias"], "mlp_bias": model["mlp_bias"], "untied": not model["tie_embeddings"],
          **extra}


@dataclasses.dataclass(frozen=True)
class _Bound:
  """One row at one layer: its torch key and jaxlm path in the chosen layout."""
  key: str
  path: Optional[str]
  row: Row
  layer: Optional[int]           # index on the stacked axis; None when the path holds one layer


class Table:
  def __init__(self, entries: Sequence[Union[Row, Layers]], title: str = "the original"):
    self.entries, self.title = tuple(entries), title

  def bound(self, sizes: Sizes, stacked: bool = False) -> Iterator[_Bound]:
    """Every row that exists for these sizes, in state_dict order."""
    for entry in self.entries:
      if isinstance(entry, Row):
        if entry.exists(sizes):
          yield _Bound(entry.torch, entry.jax, entry, None)
        continue
      for i in range(int(sizes[entry.count])):
        prefix = entry.stacked if stacked else entry.per_block.format(i=i)
        for row in entry.rows:
          if row.exists(sizes):
            yield _Bound(entry.torch.format(i=i) + row.torch, row.jax and prefix + row.jax, row, i if stacked else None)

  def schema(self, sizes: Sizes) -> "collections.OrderedDict[str, Tuple[int, ...]]":
    """torch key -> shape, in state_dict order (the shape check of layout.check_state_dict)."""
    out = collections.OrderedDict()
    for b in self.bound(sizes):
      piece = b.row.piece_shape(sizes)
      out[b.key] = (piece[0] * b.row.chunk[1],) + piece[1:]
    return out

  def buffers(self, sizes: Sizes) -> List[str]:
    """The torch keys of buffers (rows without a jaxlm path), in state_dict order."""
    return [b.key for b in self.bound(sizes) if b.path is None]

  def ties(self, sizes: Sizes) -> Dict[str, str]:
    """{copy key: first key} for torch keys that repeat an earlier whole tensor (a tied weight stored twice)."""
    first, out = {}, {}
    for b in self.bound(sizes):
      if b.path is not None and b.row.slot is None and b.row.chunk[1] == 1:
        if (b.path, b.layer) in first:
          out[b.key] = first[b.path, b.layer]
        first.setdefault((b.path, b.layer), b.key)
    return out

  def read(self, state: Mapping[str, np.ndarray], sizes: Sizes, file: str, stacked: bool = False) -> Dict[str, Any]:
    """A checked state_dict -> flat jaxlm params {path: array}."""
    pieces: Dict[str, Dict[Any, Dict[Any, np.ndarray]]] = {}  # path -> layer -> slot -> array
    axes, keys = {}, {}
    for b in self.bound(sizes, stacked):
      if b.path is None:
        continue
      c, n_chunks = b.row.chunk
      x = state[b.key] if n_chunks == 1 else np.split(state[b.key], n_chunks, axis=0)[c]
      x = b.row.transform.to_jax(x, sizes)
      slot = b.row.slot[1] if b.row.slot else None
      here = pieces.setdefault(b.path, {}).setdefault(b.layer, {})
      if slot in here:  # a second copy of a tied tensor
        if here[slot].tobytes() != x.tobytes():
          raise ConversionError(f"{file}: {b.key} differs from {keys[b.path, b.layer]}, but {self.title} ties them "
                                "(jaxlm stores one table)")
        continue
      here[slot], axes[b.path] = x, b.row.slot and b.row.slot[0]
      keys.setdefault((b.path, b.layer), b.key)
    params = {}
    for path, layers in pieces.items():  # layers in order: bound() yields layer 0 first
      per_layer = [_join(slots, axes[path]) for slots in layers.values()]
      params[path] = per_layer[0] if None in layers else np.ascontiguousarray(np.stack(per_layer))
    return params

  def write(self, params: Mapping[str, Any], sizes: Sizes, stacked: bool = False) -> List[Tuple[str, np.ndarray]]:
    """Flat jaxlm params -> (torch key, array) pairs in state_dict order."""
    pieces: Dict[str, List[Tuple[int, np.ndarray]]] = collections.OrderedDict()
    for b in self.bound(sizes, stacked):
      x = None
      if b.path is not None:
        x = np.asarray(params[b.path]) if b.layer is None else np.asarray(params[b.path])[b.layer]
        if b.row.slot:
          x = np.take(x, b.row.slot[1], axis=b.row.slot[0])
      pieces.setdefault(b.key, []).append((b.row.chunk[0], b.row.transform.to_torch(x, sizes)))
    return [(key, parts[0][1] if len(parts) == 1 else np.concatenate([x for _, x in sorted(parts, key=lambda p: p[0])]))
            for key, parts in pieces.items()]


def _join(slots: Mapping[Any, np.ndarray], axis: Optional[int]) -> np.ndarray:
  """The one array of an unslotted path, or the slots stacked along their axis."""
  if None in slots:
    return slots[None]
  return np.ascontiguousarray(np.stack([slots[s] for s in sorted(slots)], axis=axis))
