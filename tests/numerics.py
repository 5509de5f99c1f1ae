"""Comparison helpers shared by the tests."""

import numpy as np


def assert_close(actual, expected, rel=1e-5, what=""):
  """max |a - e| <= rel * max |e| (a relative tolerance on the array's scale)."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
  scale = max(np.abs(expected).max(), 1e-12)
  err = np.abs(actual - expected).max()
  assert err <= rel * scale, f"{what}: max abs err {err:.3g} > {rel:g} * {scale:.3g}"
