"""jaxlm.sampling against the definitions of its stages, on small known distributions.

The filters are checked exactly (`filter_top` returns the kept logits, -inf elsewhere) against references written
from the definitions in float64 numpy; what `choose` samples is checked empirically: one call samples many
identical rows (each row has its own key), and every token's frequency must lie within 5 standard errors of
its probability (sqrt(p(1-p)/N)), tokens outside the kept set never drawn. Seeds are fixed, so the tests are
deterministic; with another seed a 5-sigma bound fails with probability < 1e-5 per token.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import sampling
from jaxlm.sampling import Sampling

N_SAMPLES = 40_000
LOGITS = np.array([1.5, -0.5, 0.25, 2.0, -1.0, 0.75], np.float32)   # distinct, in no particular order


def softmax(x):
  x = np.asarray(x, np.float64)
  e = np.exp(x - np.max(x[np.isfinite(x)]))
  return e / e.sum()


def kept(logits, k=0, p=1.0):
  """Boolean keep-mask [B, V] of `filter_top` with top-k (k > 0) and/or top-p (p < 1) switched on."""
  logits = jnp.atleast_2d(jnp.asarray(logits, jnp.float32))
  out = sampling.filter_top(logits, jnp.int32(k), jnp.float32(p),
                            sampling.Stages(greedy=False, top_k=k > 0, top_p=p < 1.0))
  out = np.asarray(out)
  finite = np.isfinite(out)
  np.testing.assert_array_equal(out[finite], np.asarray(logits)[finite])  # kept logits are left unchanged
  return finite


def top_k_reference(logits, k):
  """The k largest, and every logit equal to the k-th largest."""
  kth = np.sort(np.asarray(logits, np.float64))[::-1][min(k, len(logits)) - 1]
  return np.asarray(logits) >= kth


def top_p_reference(logits, p, allowed=None):
  """Over the `allowed` tokens (renormalised), most likely first: a token is kept while the mass of the tokens
  before it is <= p (the originals' "remove where cumsum > p, shifted right by one"): the smallest set of most
  likely tokens whose mass exceeds p, at least the top one; tokens tied with the last kept one are kept too."""
  logits = np.asarray(logits, np.float64)
  allowed = np.ones(len(logits), bool) if allowed is None else allowed
  probs = softmax(np.where(allowed, logits, -np.inf))
  keep, mass = np.zeros(len(logits), bool), 0.0
  for i in sorted(np.nonzero(allowed)[0], key=lambda i: -logits[i]):
    if mass > p:
      break
    keep[i] = True
    mass += probs[i]
  return keep | (allowed & (logits >= logits[keep].min()))


def sample_frequencies(logits, seed=0, **settings):
  """Token frequencies of N_SAMPLES draws from `choose` with the given Sampling settings (one row per draw)."""
  s = Sampling(**settings)
  rows = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (N_SAMPLES, len(logits)))
  tokens = sampling.choose(rows, None, s.values(), s.stages(), jax.random.key(seed), jnp.int32(3))
  return np.bincount(np.asarray(tokens), minlength=len(logits)) / N_SAMPLES


def assert_sampled_from(freqs, probs):
  probs = np.asarray(probs, np.float64)
  never = probs == 0
  assert np.all(freqs[never] == 0), f"tokens outside the kept set were drawn: {freqs} vs {probs}"
  bound = 5 * np.sqrt(probs * (1 - probs) / N_SAMPLES)
  assert np.all(np.abs(freqs - probs) <= bound), f"frequencies {freqs} vs probabilities {probs} (+-{bound})"


# ------------------------------------------------------------------------------ temperature
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_samples_softmax_of_logits_over_t(temperature):
  freqs = sample_frequencies(LOGITS, temperature=temperature)
  assert_sampled_from(freqs, softmax(LOGITS / temperature))
  # the two wrong readings are far outside the tolerance (not vacuous)
  if temperature != 1.0:
    assert np.abs(freqs - softmax(LOGITS * temperature)).max() > 0.05
    assert np.abs(freqs - softmax(LOGITS)).max() > 0.05


def test_temperature_zero_is_greedy_whatever_the_key():
  s = Sampling(temperature=0.0)
  rows = jnp.asarray(np.stack([LOGITS, -LOGITS]))
  for seed in range(3):
    tokens = sampling.choose(rows, None, s.values(), s.stages(), jax.random.key(seed), jnp.int32(seed))
    assert np.asarray(tokens).tolist() == [int(np.argmax(LOGITS)), int(np.argmax(-LOGITS))]


# ------------------------------------------------------------------------------ top-k
def test_top_k_keeps_exactly_the_k_largest():
  order = np.argsort(-LOGITS)
  for k in range(1, len(LOGITS) + 1):
    expected = np.zeros(len(LOGITS), bool)
    expected[order[:k]] = True
    np.testing.assert_array_equal(kept(LOGITS, k=k)[0], expected, err_msg=f"k={k}")
  assert kept(LOGITS, k=len(LOGITS) + 5).all()                   # k past the vocabulary keeps everything


def test_top_k_keeps_ties_with_the_kth_largest():
  logits = [3.0, 2.0, 1.0, 2.0, 0.0]
  assert kept(logits, k=1)[0].tolist() == [True, False, False, False, False]
  assert kept(logits, k=2)[0].tolist() == [True, True, False, True, False]   # 2.0 twice: both stay
  assert kept(logits, k=3)[0].tolist() == [True, True, False, True, False]
  assert kept(logits, k=4)[0].tolist() == [True, True, True, True, False]


def test_top_k_samples_the_renormalised_k_largest():
  k = 3
  expected = np.where(top_k_reference(LOGITS, k), softmax(LOGITS), 0.0)
  assert_sampled_from(sample_frequencies(LOGITS, seed=1, temperature=1.0, top_k=k), expected / expected.sum())


# ------------------------------------------------------------------------------ top-p
# probabilities 0.40, 0.25, 0.15, 0.10, 0.06, 0.04 (shuffled): cumulative masses 0.40, 0.65, 0.80, 0.90, 0.96, 1
NUCLEUS_PROBS = np.array([0.10, 0.40, 0.04, 0.15, 0.25, 0.06])
NUCLEUS_ORDER = [1, 4, 3, 0, 5, 2]


@pytest.mark.parametrize("p,n_kept", [(0.0, 1), (0.2, 1), (0.39, 1), (0.41, 2), (0.6, 2), (0.66, 3), (0.79, 3),
                                      (0.81, 4), (0.89, 4), (0.91, 5), (0.95, 5), (0.97, 6), (0.999, 6)])
def test_top_p_keeps_the_smallest_set_whose_mass_exceeds_p(p, n_kept):
  logits = np.log(NUCLEUS_PROBS).astype(np.float32)
  expected = np.zeros(len(logits), bool)
  expected[NUCLEUS_ORDER[:n_kept]] = True
  np.testing.assert_array_equal(kept(logits, p=p)[0], expected)
  np.testing.assert_array_equal(top_p_reference(logits, p), expected)   # the reference agrees with the table


def test_top_p_keeps_ties_with_the_last_kept_token():
  logits = np.array([0.0, 2.0, 1.0, 1.0], np.float32)   # probabilities ~ 0.07, 0.53, 0.20, 0.20
  # mass before the first 1.0 is 0.53 <= 0.6: it is kept, and so is the other 1.0 (mass before it 0.73 > 0.6)
  assert kept(logits, p=0.6)[0].tolist() == [False, True, True, True]
  assert kept(logits, p=0.5)[0].tolist() == [False, True, False, False]


def test_top_p_is_taken_over_what_top_k_left():
  logits = np.log(np.array([0.3, 0.4, 0.1, 0.2])).astype(np.float32)
  # top-2 leaves 0.4 and 0.3, renormalised 4/7 and 3/7: p=0.5 keeps only 0.4 (over the full distribution the
  # mass before 0.3 would be 0.4 <= 0.5 and it would stay)
  assert kept(logits, k=2, p=0.5)[0].tolist() == [False, True, False, False]
  assert kept(logits, p=0.5)[0].tolist() == [True, True, False, False]
  assert kept(logits, k=2, p=0.6)[0].tolist() == [True, True, False, False]


def test_filters_match_the_reference_definitions_on_random_logits():
  rng = np.random.RandomState(0)
  v, rows = 10, 64
  logits = (rng.randn(rows, v) * 1.5).astype(np.float32)
  checked = 0
  for k in (0, 1, 3, 7, v):
    for p in (0.05, 0.3, 0.5, 0.75, 0.9, 1.0):
      if k == 0 and p == 1.0:
        continue
      got = kept(logits, k=k, p=p)
      for row in range(rows):
        allowed = top_k_reference(logits[row], k) if k else np.ones(v, bool)
        if p < 1.0:
          probs = softmax(np.where(allowed, logits[row], -np.inf))
          before = np.cumsum(np.sort(probs)[::-1]) - np.sort(probs)[::-1]
          if np.min(np.abs(before - p)) < 1e-4:   # too close to the boundary for float32: not a fair case
            continue
          expected = top_p_reference(logits[row], p, allowed)
        else:
          expected = allowed
        np.testing.assert_array_equal(got[row], expected, err_msg=f"row {row}, k={k}, p={p}")
        checked += 1
  assert checked > 1500


def test_top_p_samples_the_renormalised_nucleus_of_the_tempered_distribution():
  # temperature first, then top-k, then top-p on the renormalised top-k probabilities, then sample
  temperature, k, p = 2.0, 5, 0.6
  scaled = LOGITS / temperature
  allowed = top_k_reference(scaled, k)
  nucleus = top_p_reference(scaled, p, allowed)
  assert 1 < nucleus.sum() < k                                   # both filters bite on this case
  expected = np.where(nucleus, softmax(scaled), 0.0)
  freqs = sample_frequencies(LOGITS, seed=2, temperature=temperature, top_k=k, top_p=p)
  assert_sampled_from(freqs, expected / expected.sum())
