"""Logit comparisons relative to the largest reference logit (issue 10).

Float32 rounding in a forward pass grows with the size of the activations, so an absolute tolerance is too loose
for small logits (a 1e-5 bound on logits of magnitude 0.5 lets a 1.3x RoPE base through) and too tight for large
ones. Every fixture comparison states next to its call the error measured on the unmutated code (both the
untrained and the perturbed twin) and allows a few times that, no more: tight enough that a wrong RoPE base, a
10x norm epsilon or a norm in the wrong place fails (bench/mutants.py checks this).
"""
import numpy as np


def logit_error(got, want):
  """(max |got - want|, max |want|), computed in float64."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, f"shape {got.shape} vs {want.shape}"
  assert np.isfinite(got).all(), "non-finite values"
  return float(np.abs(got - want).max()), float(np.abs(want).max())


def assert_logits_close(got, want, rel, what="logits"):
  """max |got - want| <= rel * max |want|; prints the measured error (pytest -s shows it). Returns it, relative."""
  err, scale = logit_error(got, want)
  assert scale > 0, f"{what}: the reference is all zeros"
  print(f"\n{what}: max abs error {err:.3g} of max|logit| {scale:.3g} (relative {err / scale:.2g}, allowed {rel:.2g})")
  assert err <= rel * scale, (f"{what}: max abs error {err:.3g} > {rel:.2g} x max|logit| {scale:.3g} "
                              f"(relative {err / scale:.3g})")
  return err / scale
