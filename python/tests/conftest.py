"""Shared helpers: the repository's paths, seeded inputs, and a causal attention kernel in
PyTorch's layout written here (so that the tests do not depend on a file's kernel order)."""

import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ATTENTION = """
# Softmax attention in PyTorch's layout ([H, P, E]), optionally causal.
kernel attention {
  rank H, E = 16, F = 16, M, P
  input Q[H, P, E], K[H, M, E], V[H, M, F]
  param scale = 0.25
  QK[h, p, m] = Q[h, p, e] * K[h, m, e] * scale
  GM[h, p]    = max[m](QK[h, p, m])
  SN[h, p, m] = exp(QK[h, p, m] - GM[h, p])
  SD[h, p]    = SN[h, p, m]
  AV[h, p, f] = SN[h, p, m] / SD[h, p] * V[h, m, f]
  output AV
}

kernel causal {
  rank H, E = 16, F = 16, M, P
  input Q[H, P, E], K[H, M, E], V[H, M, F]
  param scale = 0.25
  QK[h, p, m] = Q[h, p, e] * K[h, m, e] * scale
  S[h, p, m]  = QK[h, p, m] where m <= p
  GM[h, p]    = max[m](S[h, p, m])
  SN[h, p, m] = exp(S[h, p, m] - GM[h, p])
  SD[h, p]    = SN[h, p, m]
  AV[h, p, f] = SN[h, p, m] / SD[h, p] * V[h, m, f]
  output AV
}
"""


def path(*parts):
    return os.path.join(ROOT, *parts)


def random(shape, seed, scale=1.0):
    return (np.random.default_rng(seed).uniform(-1, 1, size=shape) * scale).astype(np.float32)


def reference_attention(q, k, v, scale, causal=False):
    """Softmax attention in float64 NumPy, [H, P, E] layout."""
    s = np.einsum("hpe,hme->hpm", q.astype(np.float64), k.astype(np.float64)) * scale
    if causal:
        p, m = s.shape[1], s.shape[2]
        s = np.where(np.arange(m)[None, None, :] <= np.arange(p)[None, :, None], s, -np.inf)
    s = s - s.max(axis=2, keepdims=True)
    w = np.exp(s)
    w /= w.sum(axis=2, keepdims=True)
    return np.einsum("hpm,hmf->hpf", w, v.astype(np.float64))

