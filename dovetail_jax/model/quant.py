"""Int8 weight matrices with one float32 scale per output channel, for the draft's inference-only weights.

A draft step is a few token rows against ~19 MB of bf16 matrices that the target's verification has pushed out of
the caches, so it is memory-bound: half the bytes is the lever (`analysis/profile_decode_cycle.py`). Symmetric
per-output quantization, `w ~ q * scale[o]` with `q = round(w / scale)` in [-127, 127] and `scale = max|w_o| / 127`,
is the usual choice for inference weights (LLM.int8's vector-wise and llama.cpp's Q8_0 work the same way, with
finer blocks in Q8_0). Only what the draft proposes can change, never the output: the target verifies every token.

`Int8Weight` keeps `q` in the layout of the float matrix it stands for, so `layers.linear(x, w, in_out)` takes
either; it runs on the compiled kernel (`kernels.matmul_q8`, one byte per weight) or as XLA's
`(x . q) * scale`. Not trainable and not stored in checkpoints: quantize after loading.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

QMAX = 127  # symmetric: -128 is never used, so -q is always representable


@struct.dataclass
class Int8Weight:
    q: jax.Array  # int8, `[out, in]` or `[in, out]` like the float matrix
    scale: jax.Array  # [out] float32

    @property
    def dtype(self) -> jnp.dtype:
        return self.q.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape

    def dequantize(self, in_out: bool) -> jax.Array:
        """The float32 matrix this stands for (tests, XLA's fallback reference)."""
        return self.q.astype(jnp.float32) * (self.scale[None, :] if in_out else self.scale[:, None])


def quantize(w: np.ndarray | jax.Array, in_out: bool, device: jax.Device | None = None) -> Int8Weight:
    """Per-output symmetric int8 of the 2-D matrix `w` (`[in, out]` when `in_out`, else `[out, in]`), computed on
    the host in float64 so that it is deterministic whatever device holds `w`. An all-zero output gets scale 1."""
    a = np.asarray(jax.device_get(w), dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"quantize takes a 2-D matrix, got shape {a.shape}")
    absmax = np.abs(a).max(axis=0 if in_out else 1)
    scale = np.where(absmax > 0, absmax / QMAX, 1.0)
    q = np.clip(np.rint(a / (scale[None, :] if in_out else scale[:, None])), -QMAX, QMAX).astype(np.int8)
    put = (lambda x: jax.device_put(x, device)) if device is not None else jnp.asarray
    return Int8Weight(q=put(q), scale=put(scale.astype(np.float32)))

