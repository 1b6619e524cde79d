"""Compiled f32 kernels (f32, bf16 or int8 matmul weights) for XLA CPU, called through `jax.ffi` inside jitted forwards.

Decoding and tree verification multiply 1-32 token rows by f32 weights; that is memory-bound, so the weights should
be read once whatever T is. XLA CPU does not do that for T >= 2 (YNNPACK packs `[out, in]` weights on every call,
see README). `matmul.cc` streams each weight row (or column panel) once for all T tokens on XLA's own thread pool.
Weights stored as bfloat16 (a draft loaded from a bf16 checkpoint, `io.checkpoint.load_draft`) have their own
targets: the same blocks widen each bf16 to its f32 value in registers (exact: a bf16 is the top half of an f32), so
`matmul(x, w)` equals `matmul(x, w.astype(float32))` bit for bit and reads half the bytes. An int8 matrix with one
f32 scale per output (a quantized draft, `model.quant`) has a third pair, `matmul_q8`: the same blocks over the
widened int8 values, each output then scaled. The same holds for
attention over the KV cache: XLA runs it as batched dot_generals at ~1/3 of DRAM speed; `attention.cc` streams each
cached K/V row once for all query rows of its kv head and returns the partial softmax state (max, sum of exp, un-
normalised output) that `layers.attention` merges with the new tokens' scores; `tree_attention` goes further and
does a layer's whole attention of the new tokens in one call (RoPE, the cache part, the new tokens under the tree
mask, the merge), which XLA runs as ~10 dispatches of small ops per layer. `kv_write.cc` writes a step's or an
accepted path's K/V rows into every layer's cache in one call, in place (XLA: ~3 small ops per buffer, 60 buffers).
The SIMD blocks the first two use (dot steps, horizontal sums, axpy panels, work sharing) are in `simd.h`, which the
sources include from their own folder. The sources are compiled with the system C++ compiler on first use into one
library in the cache directory (keyed by every source and header, flags, compiler and jaxlib version; atomic, so
concurrent processes are safe) and registered as FFI targets.

Where they cannot run (no compiler, no AVX-512, build or load failure, `DOVETAIL_KERNELS=off`) `kernels_enabled()`
is False and callers use XLA: same semantics, one line on stderr, no traceback. `DOVETAIL_ATTENTION_KERNEL=off`
(read when a forward is traced) keeps the matmul kernel but computes attention with XLA, for before/after
comparisons; `DOVETAIL_TREE_ATTENTION=off` keeps the cache kernel but runs RoPE and the new tokens' part in XLA (the
path before `tree_attention`).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp

from dovetail_jax import paths

log = logging.getLogger(__name__)

# Rows per call up to which `layers.linear` uses the kernel (verification trees, decode batches). Beyond, XLA's
# GEMM; measured in a 30-layer matmul chain under load: the kernel is still ~2x faster at 64 rows, even at 128.
MAX_TOKENS = 32
# Query rows per kv head (G * T) up to which `layers.attention` uses the cache kernel (G = 3: trees of 32).
MAX_ATTENTION_ROWS = 128
SOURCES = tuple(Path(__file__).with_name(f) for f in ("matmul.cc", "attention.cc", "kv_write.cc"))
# Included by the sources as `#include "simd.h"` (a quoted include: found in the including file's folder, whatever
# the working directory). Not compiled on its own, but a change to it must rebuild: it is part of the build key.
HEADERS = (Path(__file__).with_name("simd.h"),)
CXX_FLAGS = ("-O3", "-march=x86-64-v4", "-mtune=znver3", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden")
REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512dq", "avx512vl", "fma")  # what -march=x86-64-v4 emits
TARGETS = {"out_in": "dovetail_matmul_oi", "in_out": "dovetail_matmul_io"}
_SYMBOLS = {"out_in": "DovetailMatmulOI", "in_out": "DovetailMatmulIO"}
BF16_TARGETS = {"out_in": "dovetail_matmul_oi_bf16", "in_out": "dovetail_matmul_io_bf16"}  # bf16 weights
_BF16_SYMBOLS = {"out_in": "DovetailMatmulOIBf16", "in_out": "DovetailMatmulIOBf16"}
Q8_TARGETS = {"out_in": "dovetail_matmul_oi_q8", "in_out": "dovetail_matmul_io_q8"}  # int8 weights + scales
_Q8_SYMBOLS = {"out_in": "DovetailMatmulOIQ8", "in_out": "DovetailMatmulIOQ8"}
WEIGHT_DTYPES = (jnp.float32, jnp.bfloat16)  # what `matmul` takes as weights (activations are always f32)
ATTENTION_TARGET = "dovetail_cache_attention"
_ATTENTION_SYMBOL = "DovetailCacheAttention"
TREE_ATTENTION_TARGET = "dovetail_tree_attention"
_TREE_ATTENTION_SYMBOL = "DovetailTreeAttention"
KV_WRITE_TARGET = "dovetail_kv_write"
_KV_WRITE_SYMBOL = "DovetailKvWrite"


class KernelUnavailable(RuntimeError):
    """Why the compiled kernels cannot be used on this machine (reported once, then XLA's dot is used)."""


def cache_dir() -> Path:
    """Where built kernels live: `$DOVETAIL_CACHE_DIR/kernels`, default `~/.cache/dovetail_jax/kernels`."""
    return paths.kernels_cache()


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if not cxx:
        raise KernelUnavailable("no C++ compiler found (set $CXX)")
    return cxx


def build_key(cxx: str) -> str:
    """What a built library depends on, hashed: every source and header, the flags, the compiler, jaxlib's
    version (its FFI headers). A change to any of them gives a new file name, so a stale library is never loaded."""
    import jaxlib

    texts = [p.read_bytes() for p in (*SOURCES, *HEADERS)]
    return hashlib.sha256(b"\0".join([*texts, " ".join(CXX_FLAGS).encode(), jaxlib.__version__.encode(),
                                      cxx.encode()])).hexdigest()[:16]


def build(force: bool = False) -> Path:
    """Compile the kernel sources into one library in the cache (once per `build_key`) and return its path."""
    cxx = _compiler()
    include = jax.ffi.include_dir()
    out = cache_dir() / f"dovetail_kernels_{build_key(cxx)}.so"
    if out.exists() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.stem + ".", suffix=".tmp.so", dir=out.parent)
    os.close(fd)
    try:
        cmd = [cxx, *CXX_FLAGS, "-isystem", include, *map(str, SOURCES), "-o", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
            raise KernelUnavailable(f"compiling {', '.join(p.name for p in SOURCES)} failed: {tail[0]}")
        os.replace(tmp, out)  # atomic: a racing process either sees no file or a complete one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.cache
def _load() -> str | None:
    """Build, load and register the kernels once per process; None if they are usable, else the reason."""
    if os.environ.get("DOVETAIL_KERNELS", "on").strip().lower() in ("off", "0", "false", "no"):
        return "DOVETAIL_KERNELS=off"
    missing = [f for f in REQUIRED_CPU_FLAGS if f not in _cpu_flags()]
    if missing:
        return f"the CPU lacks {', '.join(missing)}"
    try:
        lib = ctypes.CDLL(str(build()))
        for targets, symbols in ((TARGETS, _SYMBOLS), (BF16_TARGETS, _BF16_SYMBOLS), (Q8_TARGETS, _Q8_SYMBOLS)):
            for layout, name in targets.items():
                fn = getattr(lib, symbols[layout])
                jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(fn), platform="cpu")
        for name, symbol in ((ATTENTION_TARGET, _ATTENTION_SYMBOL), (TREE_ATTENTION_TARGET, _TREE_ATTENTION_SYMBOL),
                             (KV_WRITE_TARGET, _KV_WRITE_SYMBOL)):
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    except Exception as e:  # any build or load failure means "use XLA's dot", never a crash
        return f"{type(e).__name__}: {e}" if not isinstance(e, KernelUnavailable) else str(e)
    return None


@functools.cache
def kernels_enabled() -> bool:
    """True when the compiled kernels are registered; logs why not (once per process) otherwise."""
    reason = _load()
    if reason is None:
        return True
    if reason == "DOVETAIL_KERNELS=off":
        log.info("dovetail: compiled matmul/attention kernels off (%s); using XLA", reason)
    else:
        log.warning("dovetail: compiled matmul/attention kernels unavailable (%s); using XLA", reason)
    return False


_forced_off = 0  # > 0 inside `xla_only()`


@contextlib.contextmanager
def xla_only() -> Iterator[None]:
    """Functions *traced* inside use XLA even where the kernels could run (benchmarks compare both)."""
    global _forced_off
    _forced_off += 1
    try:
        yield
    finally:
        _forced_off -= 1


def supports(x: jax.Array, w: jax.Array) -> bool:
    """Whether `matmul(x, w)` may use the kernel: f32 `x`, 2-D f32 or bf16 weights, 1..MAX_TOKENS rows, kernels
    built."""
    if _forced_off:
        return False
    rows = 1
    for d in x.shape[:-1]:
        rows *= d
    return (x.dtype == jnp.float32 and w.dtype in WEIGHT_DTYPES and w.ndim == 2 and 1 <= rows <= MAX_TOKENS
            and x.ndim >= 1 and kernels_enabled())


def matmul(x: jax.Array, w: jax.Array, layout: str) -> jax.Array:
    """`x [..., in]` times `w` (`[out, in]` for "out_in", `[in, out]` for "in_out") -> `[..., out]`, on the CPU.
    `x` f32; `w` f32 or bf16 (then exactly the result for `w.astype(float32)`); the result f32.

    Call only when `supports(x, w)`; no autodiff rule of its own (`layers.linear` adds one).
    """
    if not kernels_enabled():
        raise KernelUnavailable(f"compiled matmul kernels unavailable: {_load()}")
    k = x.shape[-1]
    n = w.shape[0] if layout == "out_in" else w.shape[1]
    x2 = x.reshape(-1, k)
    target = (BF16_TARGETS if w.dtype == jnp.bfloat16 else TARGETS)[layout]
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((x2.shape[0], n), jnp.float32),
                            vmap_method="sequential")
    return call(x2, w).reshape(*x.shape[:-1], n)


def supports_q8(x: jax.Array, q: jax.Array, scale: jax.Array, layout: str) -> bool:
    """Whether `matmul_q8(x, q, scale, layout)` may use the kernel: f32 `x` of 1..MAX_TOKENS rows, a 2-D int8
    `q`, one f32 scale per output, kernels built."""
    if _forced_off or q.ndim != 2 or scale.ndim != 1:
        return False
    rows = 1
    for d in x.shape[:-1]:
        rows *= d
    n = q.shape[0] if layout == "out_in" else q.shape[1]
    return (x.dtype == jnp.float32 and q.dtype == jnp.int8 and scale.dtype == jnp.float32 and scale.shape[0] == n
            and 1 <= rows <= MAX_TOKENS and x.ndim >= 1 and kernels_enabled())


def matmul_q8(x: jax.Array, q: jax.Array, scale: jax.Array, layout: str) -> jax.Array:
    """`x [..., in]` times the int8 matrix `q` (layout as for `matmul`) scaled per output: `(x . q) * scale`
    -> `[..., out]` f32, reading one byte per weight. Call only when `supports_q8`."""
    if not kernels_enabled():
        raise KernelUnavailable(f"compiled matmul kernels unavailable: {_load()}")
    k = x.shape[-1]
    n = q.shape[0] if layout == "out_in" else q.shape[1]
    x2 = x.reshape(-1, k)
    call = jax.ffi.ffi_call(Q8_TARGETS[layout], jax.ShapeDtypeStruct((x2.shape[0], n), jnp.float32),
                            vmap_method="sequential")
    return call(x2, q, scale).reshape(*x.shape[:-1], n)


def attention_enabled() -> bool:
    """Whether the cache-attention kernel may be used at all (kernels built, not switched off, not in `xla_only`)."""
    off = os.environ.get("DOVETAIL_ATTENTION_KERNEL", "on").strip().lower() in ("off", "0", "false", "no")
    return not _forced_off and not off and kernels_enabled()


def supports_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> bool:
    """Whether `cache_attention(q, k, v, ...)` may run: f32 `q [B, K, M, D]`, `k, v [B, K, S, D]` of matching
    (B, K, D), 1..MAX_ATTENTION_ROWS query rows, the kernel enabled."""
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        return False
    b, kh, m, d = q.shape
    return (all(a.dtype == jnp.float32 for a in (q, k, v)) and k.shape[:2] == (b, kh) and k.shape[3] == d
            and 1 <= m <= MAX_ATTENTION_ROWS and d >= 1 and attention_enabled())


def cache_attention(q: jax.Array, k: jax.Array, v: jax.Array, lo: jax.Array,
                    hi: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Partial softmax attention of `q [B, K, M, D]` (already scaled) over cache slots `[lo[b], hi)` of
    `k, v [B, K, S, D]` (`lo [B]`, `hi` scalar or `[B]`, int32; clipped to [0, S]).

    Returns `m [B, K, M]` (max score), `l [B, K, M]` (sum of exp(s - m)) and `o [B, K, M, D]` (sum of
    exp(s - m) v); an empty range gives m = -inf, l = 0, o = 0. Call only when `supports_attention`; no
    autodiff rule of its own (`layers.attention` adds one).
    """
    if not kernels_enabled():
        raise KernelUnavailable(f"compiled kernels unavailable: {_load()}")
    b, kh, m, d = q.shape
    f32 = jnp.float32
    call = jax.ffi.ffi_call(ATTENTION_TARGET, (jax.ShapeDtypeStruct((b, kh, m), f32),
                                               jax.ShapeDtypeStruct((b, kh, m), f32),
                                               jax.ShapeDtypeStruct((b, kh, m, d), f32)),
                            vmap_method="sequential")
    return call(q, k, v, jnp.asarray(lo, jnp.int32).reshape(b), jnp.asarray(hi, jnp.int32))


def supports_tree_attention(qkv: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> bool:
    """Whether `tree_attention(qkv, ..., k, v, ..., mask)` may run: f32 `qkv [B, T, (N + 2K) D]` and cache
    `k, v [B, K, S, D]`, K | N, even D, a bool mask `[T, T]` or `[B, T, T]` (no keys but the new tokens'), at most
    MAX_ATTENTION_ROWS query rows per kv head, the attention kernel enabled."""
    if qkv.ndim != 3 or k.ndim != 4 or k.shape != v.shape:
        return False
    b, t, width = qkv.shape
    _, kh, _, d = k.shape
    if d < 2 or d % 2 or width % d or kh < 1:
        return False
    n = width // d - 2 * kh
    return (n >= kh and n % kh == 0 and k.shape[0] == b and all(a.dtype == jnp.float32 for a in (qkv, k, v))
            and mask.dtype == jnp.bool_ and mask.shape in ((t, t), (b, t, t))
            and 1 <= (n // kh) * t <= MAX_ATTENTION_ROWS and attention_enabled()
            and os.environ.get("DOVETAIL_TREE_ATTENTION", "on").strip().lower() not in ("off", "0", "false", "no"))


def tree_attention(qkv: jax.Array, cos: jax.Array, sin: jax.Array, k: jax.Array, v: jax.Array, lo: jax.Array,
                   hi: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A layer's attention of T new tokens, from the fused projection `qkv [B, T, (N + 2K) D]` (pre-RoPE):
    RoPE (`cos, sin [B, T, D/2]`, rotate-half), the committed slots `[lo[b], hi)` of `k, v [B, K, S, D]`, the new
    tokens under `mask [T, T]` or `[B, T, T]` (i sees j), one softmax over both.

    Returns `out [B, T, N D]` and the new tokens' RoPE'd keys and values `[B, T, K, D]` (for the cache write).
    A query that sees nothing gets 0. Call only when `supports_tree_attention`; no autodiff rule of its own
    (`layers.self_attention` adds one).
    """
    if not kernels_enabled():
        raise KernelUnavailable(f"compiled kernels unavailable: {_load()}")
    b, t, width = qkv.shape
    kh, d = k.shape[1], k.shape[3]
    n = width // d - 2 * kh
    f32 = jnp.float32
    call = jax.ffi.ffi_call(TREE_ATTENTION_TARGET, (jax.ShapeDtypeStruct((b, t, n * d), f32),
                                                    jax.ShapeDtypeStruct((b, t, kh, d), f32),
                                                    jax.ShapeDtypeStruct((b, t, kh, d), f32)),
                            vmap_method="sequential")
    return call(qkv, cos, sin, k, v, jnp.asarray(lo, jnp.int32).reshape(b), jnp.asarray(hi, jnp.int32), mask)


def supports_kv_write(caches: tuple[jax.Array, ...], updates: tuple[jax.Array, ...], width: int) -> bool:
    """Whether `kv_write(caches, updates, ...)` may run: as many f32 caches `[B, K, S, D]` as f32 updates
    `[B, T, K, D]` of matching (B, K, D), 1 <= W <= S rows written, the kernels built."""
    if _forced_off or not caches or len(caches) != len(updates):
        return False
    for c, u in zip(caches, updates, strict=True):
        if (c.ndim != 4 or u.ndim != 4 or c.dtype != jnp.float32 or u.dtype != jnp.float32
                or (u.shape[0], u.shape[2], u.shape[3]) != (c.shape[0], c.shape[1], c.shape[3])
                or not 1 <= width <= c.shape[2] or u.shape[1] < 1):
            return False
    return kernels_enabled()


def kv_write(caches: tuple[jax.Array, ...], updates: tuple[jax.Array, ...], path: jax.Array,
             start: jax.Array) -> tuple[jax.Array, ...]:
    """Rows `path [W]` of every `updates[i] [B, T, K, D]` into slots `start .. start + W` of `caches[i]
    [B, K, S, D]`, as `lax.dynamic_update_slice` would (start clamped to [0, S - W]); in place when the caches
    are donated. Call only when `supports_kv_write`."""
    if not kernels_enabled():
        raise KernelUnavailable(f"compiled kernels unavailable: {_load()}")
    n = len(caches)
    call = jax.ffi.ffi_call(KV_WRITE_TARGET, tuple(jax.ShapeDtypeStruct(c.shape, c.dtype) for c in caches),
                            input_output_aliases={2 + n + i: i for i in range(n)}, vmap_method="sequential")
    return tuple(call(jnp.asarray(path, jnp.int32).reshape(-1), jnp.asarray(start, jnp.int32).reshape(()),
                      *updates, *caches))
