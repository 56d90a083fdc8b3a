"""model.vocab_multiple: vocabulary axes padded inside the model, invisible outside it, exact to strip and re-pad."""
import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.models import decoder, layout

CONFIG = decoder.DecoderConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, d_ff=64, head_bias=True,
                               vocab_multiple=128)


@pytest.mark.parametrize("tie", [False, True])
def test_padded_model_equals_its_unpadded_form(tie):
  config = dataclasses.replace(CONFIG, tie_embeddings=tie)
  padded = decoder.Decoder(config)
  tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, 97)
  params = jax.tree.map(np.asarray, nn.unbox(padded.init(jax.random.key(1), tokens)["params"]))
  assert params["embed"]["embedding"].shape == (128, 32)
  assert not params["embed"]["embedding"][97:].any()  # padding rows start (and stay) zero
  model_dict, unpadded = layout.canonical(config.to_dict(), params)
  assert model_dict["vocab_multiple"] == 1 and unpadded["embed"]["embedding"].shape == (97, 32)
  plain = decoder.Decoder(decoder.DecoderConfig.from_dict(model_dict))
  logits = padded.apply({"params": params}, tokens)
  assert logits.shape == (2, 12, 97)
  np.testing.assert_allclose(logits, plain.apply({"params": unpadded}, tokens), atol=2e-7)
  batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, 1), "weights": jnp.ones(tokens.shape)}
  np.testing.assert_allclose(padded.apply({"params": params}, batch, method="loss")[0],
                             plain.apply({"params": unpadded}, batch, method="loss")[0], rtol=1e-6)
  _, repadded = layout.set_vocab_multiple(model_dict, unpadded, 128)
  for a, b in zip(jax.tree.leaves(repadded), jax.tree.leaves(params)):
    assert np.array_equal(a, b)


def test_hrm_text1_pads_its_tied_table_and_computes_the_same():
  """HRM-Text1 (tied table, chunked loss): the padded model's logits and loss equal its unpadded form's, padded ids
  never win and their rows get no gradient."""
  from jaxlm.models import hrm_text1
  config = hrm_text1.HRMText1Config(vocab_size=97, d_model=16, n_heads=2, n_layers=1, d_ff=32, halt_max_steps=2,
                                    dropout=0.0, attention_dropout=0.0, mlp_dropout=0.0, vocab_multiple=128,
                                    xent_chunk=4)
  padded = hrm_text1.HRMText1(config)
  tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 97)
  params = jax.tree.map(np.array, nn.unbox(jax.jit(padded.init)(jax.random.key(1), tokens)["params"]))
  assert params["embed"]["embedding"].shape == (128, 16) and not params["embed"]["embedding"][97:].any()
  model_dict, unpadded = layout.canonical({**config.to_dict(), "arch": "hrm_text1"}, params)
  plain = hrm_text1.HRMText1(hrm_text1.HRMText1Config.from_dict(model_dict))
  assert unpadded["embed"]["embedding"].shape == (97, 16)
  logits = jax.jit(lambda p, model: model.apply({"params": p}, tokens), static_argnums=1)  # compiled, not op by op
  want = logits(unpadded, plain)  # matmuls of other widths: float32 rounding, relative to the largest logit
  np.testing.assert_allclose(logits(params, padded), want, atol=1e-6 * float(jnp.abs(want).max()))
  params["embed"]["embedding"][97:] = 3.0  # padding rows that would win every logit
  batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, 1), "weights": jnp.ones(tokens.shape)}
  loss_fn = jax.jit(lambda p, model: model.apply({"params": p}, batch, method="loss")[0], static_argnums=1)
  loss, grads = jax.jit(jax.value_and_grad(loss_fn), static_argnums=1)(params, padded)
  np.testing.assert_allclose(loss, loss_fn(unpadded, plain), rtol=1e-6)
  assert int(jnp.argmax(logits(params, padded), -1).max()) < 97
  assert not np.asarray(grads["embed"]["embedding"])[97:].any()


def test_padded_ids_never_win_and_get_no_gradient():
  padded = decoder.Decoder(CONFIG)
  tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, 97)
  params = nn.unbox(padded.init(jax.random.key(1), tokens)["params"])
  params["head"]["bias"] = params["head"]["bias"].at[97:].set(1e4)  # padding columns that would win
  batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, 1), "weights": jnp.ones(tokens.shape)}
  loss, grads = jax.value_and_grad(lambda p: padded.apply({"params": p}, batch, method="loss")[0])(params)
  assert float(loss) < 1e3  # the padded logits are masked out of the softmax
  hidden, project = padded.apply({"params": params}, tokens, return_hidden=True)
  assert int(jnp.argmax(project(hidden), -1).max()) < 97
  assert not np.asarray(grads["head"]["kernel"])[:, 97:].any()
  assert not np.asarray(grads["head"]["bias"])[97:].any()
  assert not np.asarray(grads["embed"]["embedding"])[97:].any()


def test_stripping_refuses_padding_that_is_not_zero():
  tokens = jnp.zeros((1, 4), jnp.int32)
  params = jax.tree.map(np.array, nn.unbox(decoder.Decoder(CONFIG).init(jax.random.key(1), tokens)["params"]))
  params["embed"]["embedding"][100, 3] = 0.5
  with pytest.raises(ValueError, match=r"embed/embedding: the padded vocabulary rows 97\.\.127 are not zero"):
    layout.canonical(CONFIG.to_dict(), params)


def test_a_padded_training_run_loads_unpadded_everywhere(tmp_path):
  from jaxlm import modeldir, trainer
  from jaxlm.checkpoint import restore_for_inference
  from jaxlm.config_defaults import load_config

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config = load_config(os.path.join(root, "configs", "yinggem.py:tiny"))
  config.model.update(d_model=32, n_layers=1, n_heads=2, d_ff=64, attention_window=16, max_seq_len=16,
                      vocab_multiple=128, tie_embeddings=True)
  config.data.update(eval_batches=1)
  config.train.update(steps=3, batch_size=4, seq_len=16, eval_every=3, save_every=3, log_every=1, sample_tokens=4,
                      progress=False)
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(config, workdir)
  model_dict, params, _ = restore_for_inference(workdir)
  vocab = model_dict["vocab_size"]
  assert params["embed"]["embedding"].shape[0] == 128 > vocab
  assert not np.asarray(params["embed"]["embedding"])[vocab:].any()  # three AdamW steps left the padding zero
  loaded = modeldir.load(workdir)
  assert loaded.params["embed"]["embedding"].shape[0] == vocab
  np.testing.assert_array_equal(loaded.params["embed"]["embedding"], np.asarray(params["embed"]["embedding"])[:vocab])
