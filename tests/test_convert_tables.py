"""convert/table.py: each family's one table of (torch key, jaxlm path, transform) rows.

On random tensors of the table's own shapes: every row's transform pair is an exact inverse, read and write are
exact inverses in the per-block and the stacked (nn.scan) layout, the stacked layout is the per-block one with a
leading layer axis (jaxlm.models.layout's for the decoders), and a state_dict missing a table key is refused by name.
"""
import os

import numpy as np
import pytest
from flax import traverse_util

from convert import api, hrm, hrm_text1, hrom, layout, llama, optimus_prime, yinggem
from convert.errors import ConversionError
from convert.table import Layers
from jaxlm.models import layout as jax_layout

INV_FREQ = layout.rope_inv_freq(4, 10000.0)  # head_dim 4 everywhere a buffer is written
# Small sizes per family (tables name them); llama twice: biases and its own head, then tied, bias-free, with the
# interleaved-RoPE permutation of q and k, and a head_dim that is not d / heads.
CASES = {
    "yinggem": (yinggem.TABLE, dict(v=11, d=8, n=2, hd=4, f=6, n_layers=3, inv_freq=INV_FREQ)),
    "hrom": (hrom.TABLE, dict(v=11, d=8, n=2, hd=4, f=6, n_layers=3, inv_freq=INV_FREQ)),
    "optimus_prime": (optimus_prime.TABLE, dict(v=11, d=8, n=4, k=2, hd=2, f=6, n_layers=3)),
    "llama": (llama.TABLE, dict(v=11, d=8, n=4, k=2, hd=3, f=6, n_layers=3, attn_bias=True, mlp_bias=True,
                                untied=True, rope_perm=None)),
    "llama_tied_interleaved": (llama.TABLE, dict(v=11, d=8, n=4, k=2, hd=4, f=6, n_layers=3, attn_bias=False,
                                                 mlp_bias=False, untied=False,
                                                 rope_perm=layout.interleaved_to_half(4))),
    "hrm": (hrm.TABLE, dict(v=11, d=8, n=2, hd=4, f=6, l_layers=3, h_layers=2, inv_freq=INV_FREQ)),
    "hrm_text1": (hrm_text1.TABLE, dict(v=11, d=8, n=2, hd=4, f=6, n_layers=3, tied_copy=True, inv_freq=INV_FREQ)),
}
DECODERS = ("yinggem", "hrom", "optimus_prime", "llama", "llama_tied_interleaved")


def random_state(table, sizes, seed=0):
  """A state_dict of the table's keys and shapes: random tensors, the sizes' buffers, tied copies equal."""
  rng = np.random.default_rng(seed)
  state = {k: rng.standard_normal(shape).astype(np.float32) for k, shape in table.schema(sizes).items()}
  for key in table.buffers(sizes):
    state[key] = INV_FREQ.copy()
  for copy, first in table.ties(sizes).items():
    state[copy] = state[first].copy()
  return state


def assert_same(got, want):
  """Same keys in the same order, dtypes, shapes and bytes."""
  assert list(got) == list(want)
  for key in want:
    a, b = np.asarray(got[key]), np.asarray(want[key])
    assert (a.dtype, a.shape) == (b.dtype, b.shape), key
    assert a.tobytes() == b.tobytes(), key


def all_rows(table):
  for entry in table.entries:
    yield from (entry.rows if isinstance(entry, Layers) else (entry,))


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_rows_transform_pair_is_an_exact_inverse(case):
  table, sizes = CASES[case]
  rng = np.random.default_rng(1)
  if case.startswith("llama"):  # a permutation that is not its own inverse: a cycle over head_dim (>= 3)
    sizes = dict(sizes, rope_perm=np.roll(np.arange(sizes["hd"]), 1))
  for row in all_rows(table):
    if row.jax is None:  # a buffer: written from the sizes
      assert row.transform.to_torch(None, sizes).tobytes() == sizes["inv_freq"].tobytes(), row.torch
      continue
    x = rng.standard_normal(row.piece_shape(sizes)).astype(np.float32)
    y = row.transform.to_jax(x, sizes)
    assert row.transform.to_torch(y, sizes).tobytes() == x.tobytes(), row.torch
    y = rng.standard_normal(y.shape).astype(np.float32)
    back = row.transform.to_jax(row.transform.to_torch(y, sizes), sizes)
    assert back.shape == y.shape and back.tobytes() == y.tobytes(), row.jax


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("stacked", [False, True], ids=["per_block", "stacked"])
def test_read_and_write_are_exact_inverses(case, stacked):
  table, sizes = CASES[case]
  state = random_state(table, sizes)
  params = table.read(state, sizes, "f", stacked=stacked)
  assert_same(dict(table.write(params, sizes, stacked=stacked)), state)  # key order included
  rng = np.random.default_rng(2)
  params = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
  assert_same(table.read(dict(table.write(params, sizes, stacked=stacked)), sizes, "f", stacked=stacked), params)


@pytest.mark.parametrize("case", sorted(CASES))
def test_stacked_layout_is_the_per_block_one_with_a_leading_layer_axis(case):
  table, sizes = CASES[case]
  state = random_state(table, sizes)
  per_block, stacked = table.read(state, sizes, "f"), table.read(state, sizes, "f", stacked=True)
  for entry in table.entries:
    if isinstance(entry, Layers):
      for row in entry.rows:
        if row.jax is not None and row.exists(sizes):
          layers = [per_block[entry.per_block.format(i=i) + row.jax] for i in range(sizes[entry.count])]
          assert stacked[entry.stacked + row.jax].tobytes() == np.stack(layers).tobytes(), row.jax
  if case in DECODERS:  # the layout jaxlm's nn.scan decoder stack uses
    tree = jax_layout.stack_layers(traverse_util.unflatten_dict(per_block, sep="/"), sizes["n_layers"])
    want = traverse_util.flatten_dict(tree, sep="/")
    assert sorted(want) == sorted(stacked)
    assert all(np.array_equal(want[k], stacked[k]) for k in want)


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_state_dict_missing_a_table_key_is_refused_by_name(case):
  table, sizes = CASES[case]
  state = random_state(table, sizes)
  key = list(state)[-2]
  del state[key]
  with pytest.raises(ConversionError, match=f"^ckpt.pt: missing tensor '{key}'$"):
    layout.check_state_dict(state, table.schema(sizes), "ckpt.pt")


def test_a_checkpoint_missing_a_chunked_key_names_it(tmp_path):
  """Through the family: HROM's fused qkv bias (three rows, one key) removed from the fixture checkpoint."""
  torch = pytest.importorskip("torch")
  src = os.path.join(os.path.dirname(__file__), "fixtures", "hrom", "hrom_20261125_133958_step0.pt")
  checkpoint = torch.load(src, weights_only=True)
  del checkpoint["model"]["blocks.1.attn.qkv.bias"]
  torch.save(checkpoint, tmp_path / "hrom.pt")
  with pytest.raises(ConversionError, match=r"hrom\.pt: missing tensor 'blocks\.1\.attn\.qkv\.bias'"):
    api.torch2jax(str(tmp_path / "hrom.pt"), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


def test_a_tied_copy_that_differs_is_refused():
  table, sizes = CASES["hrm_text1"]
  state = random_state(table, sizes)
  state["lm_head.weight"] = state["lm_head.weight"] + 1
  with pytest.raises(ConversionError, match="f: lm_head.weight differs from token_embeddings.weight, but HRMText1 "
                                            r"ties them \(jaxlm stores one table\)"):
    table.read(state, sizes, "f", stacked=True)


def test_rows_of_one_key_cover_it_exactly():
  """Chunks of one torch key are 0..C-1 of the same C, and slots of one path are 0..S-1: nothing is dropped."""
  for case, (table, sizes) in CASES.items():
    chunks, slots = {}, {}
    for b in table.bound(sizes):
      chunks.setdefault(b.key, []).append(b.row.chunk)
      if b.row.slot:
        slots.setdefault(b.path, []).append(b.row.slot)
    for key, found in chunks.items():
      assert sorted(c for c, _ in found) == list(range(found[0][1])) and len({n for _, n in found}) == 1, (case, key)
    for path, found in slots.items():
      assert sorted(s for _, s in found) == list(range(len(found))) and len({a for a, _ in found}) == 1, (case, path)
