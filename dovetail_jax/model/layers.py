"""The LLaMA building blocks as small pure functions (shared by the target and the draft).

Shapes: B batch, T new tokens, S cache slots, N query heads, K kv heads, D head dim, H hidden, F MLP width.
Projection weights are `[out, in]` (torch's Linear layout) or `[in, out]`, as `params.py` chose; `linear`
applies either.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dovetail_jax import kernels
from dovetail_jax.model.quant import Int8Weight

NEG_INF = jnp.finfo(jnp.float32).min


def linear(x: jax.Array, w: jax.Array | Int8Weight, in_out: bool = False) -> jax.Array:
    """`x [..., in]` times `w` -> `[..., out]`; `w` is `[out, in]`, or `[in, out]` when `in_out`.

    1-32 f32 token rows on the CPU go to the compiled kernel of `dovetail_jax.kernels` (it reads the weights
    once for all rows; XLA CPU re-packs `[out, in]` weights per call); otherwise, or where the kernel is
    unavailable, XLA's dot. Gradients are XLA's dot's in both cases. A bfloat16 `w` with f32 `x` (the draft's
    weights as a bf16 checkpoint stores them) gives exactly the result for `w.astype(float32)` on both paths:
    the kernel widens it in registers (reading half the bytes), XLA's path upcasts it inside the program.
    An `Int8Weight` (a quantized draft) gives `(x . q) * scale`: `kernels.matmul_q8` on the CPU, else XLA; no
    gradient rule (inference only).
    """
    if isinstance(w, Int8Weight):
        layout = "in_out" if in_out else "out_in"
        if kernels.supports_q8(x, w.q, w.scale, layout):
            return jax.lax.platform_dependent(x, w.q, w.scale, cpu=functools.partial(kernels.matmul_q8, layout=layout),
                                              default=functools.partial(_xla_linear_q8, in_out=in_out))
        return _xla_linear_q8(x, w.q, w.scale, in_out)
    if kernels.supports(x, w):
        return jax.lax.platform_dependent(x, w, cpu=functools.partial(_kernel_linear, in_out=in_out),
                                          default=functools.partial(_xla_linear, in_out=in_out))
    return _xla_linear(x, w, in_out)


def _xla_linear(x: jax.Array, w: jax.Array, in_out: bool) -> jax.Array:
    if w.dtype == jnp.bfloat16 and x.dtype == jnp.float32:
        w = w.astype(jnp.float32)
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0 if in_out else 1,)), ((), ())))


def _xla_linear_q8(x: jax.Array, q: jax.Array, scale: jax.Array, in_out: bool) -> jax.Array:
    return _xla_linear(x, q.astype(x.dtype), in_out) * scale


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _kernel_linear(x: jax.Array, w: jax.Array, in_out: bool) -> jax.Array:
    return kernels.matmul(x, w, "in_out" if in_out else "out_in")


def _kernel_linear_fwd(x: jax.Array, w: jax.Array, in_out: bool) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return _kernel_linear(x, w, in_out), (x, w)


def _kernel_linear_bwd(in_out: bool, res: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array, jax.Array]:
    _, vjp = jax.vjp(functools.partial(_xla_linear, in_out=in_out), *res)
    return vjp(g)


_kernel_linear.defvjp(_kernel_linear_fwd, _kernel_linear_bwd)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm in float32, as HF LLaMA computes it."""
    var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(var + eps) * weight


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables `[B, T, D/2]` for integer positions `[B, T]` (HF's inverse-frequency formula)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE on `[B, T, heads, D]` (pairs (i, i + D/2), HF's convention)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def attention(
    q: jax.Array,  # [B, T, N, D] new queries
    k_new: jax.Array,  # [B, U, K, D] keys not in the cache (U = T, or more when earlier uncommitted keys lead)
    v_new: jax.Array,  # [B, U, K, D]
    k_cache: jax.Array | None,  # [B, K, S, D] committed keys (slots >= prefix_len are stale); None: no prefix
    v_cache: jax.Array | None,  # [B, K, S, D]
    prefix_len: jax.Array,  # scalar: committed slots, all visible
    tree_mask: jax.Array,  # [T, U] bool: new query i sees new key j; or [B, T, U] per row
    kv_start: jax.Array | None = None,  # [B] int32: slots before it are hidden from that row (left padding)
) -> jax.Array:
    """Grouped-query attention of T new tokens over the committed prefix and over each other.

    The cache is read as it was *before* this step's write, and the new keys are scored separately; one
    softmax spans both. Reading the just-written cache instead makes XLA CPU materialise a copy of every
    layer's cache each step (measured 2x slower decode at 2048 slots). The cache part is the compiled kernel
    of `dovetail_jax.kernels` where it runs (f32, up to MAX_ATTENTION_ROWS query rows per kv head): it streams
    the visible slots once for all queries and returns a partial softmax (max, sum, un-normalised output) that
    is merged exactly with the new tokens' part; elsewhere two matmuls batched over (B, K). Gradients through
    the kernel are those of the XLA computation. Without a cache (a prefill from empty) only the new tokens
    are scored. A per-row `[B, T, U]` mask and `kv_start` serve batched generation over left-padded prompts.
    A query row that sees no key at all gets an arbitrary average (the XLA path averages over every slot).
    Returns `[B, T, N*D]`.
    """
    b, t, n, d = q.shape
    u, kh = k_new.shape[1], k_new.shape[2]
    g = n // kh
    dims = (((3,), (3,)), ((0, 1), (0, 1)))  # contract D, batch over (B, K)
    pv = (((3,), (2,)), ((0, 1), (0, 1)))  # contract slots, batch over (B, K)
    qh = q.reshape(b, t, kh, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kh, g * t, d) * (d**-0.5)
    kn = k_new.transpose(0, 2, 1, 3)  # [B, K, T, D]
    vn = v_new.transpose(0, 2, 1, 3)
    s_new = jax.lax.dot_general(qh, kn, dims).reshape(b, kh, g, t, u)  # [B, K, G, T, U]
    if tree_mask.ndim == 3:
        tree_mask = tree_mask[:, None, None]  # [B, 1, 1, T, U]
    s_new = jnp.where(tree_mask, s_new, NEG_INF)
    m = s_new.max(-1, keepdims=True)
    fused = k_cache is not None and kernels.supports_attention(qh, k_cache, v_cache)
    if fused:  # partial softmax over the cache: m_c [B, K, G, T, 1] (-inf: nothing visible), l_c, o_c [.., D]
        lo = jnp.zeros((b,), jnp.int32) if kv_start is None else kv_start.astype(jnp.int32)
        m_c, l_c, o_c = _cache_partial(qh, k_cache, v_cache, lo, jnp.asarray(prefix_len, jnp.int32))
        m_c, l_c, o_c = m_c.reshape(b, kh, g, t, 1), l_c.reshape(b, kh, g, t, 1), o_c.reshape(b, kh, g, t, d)
        m = jnp.maximum(m, m_c)  # >= NEG_INF: finite, so exp(m_c - m) is 0 for an empty range
    elif k_cache is not None:
        s_cache = jax.lax.dot_general(qh, k_cache, dims).reshape(b, kh, g, t, -1)  # [B, K, G, T, S]
        slot = jnp.arange(k_cache.shape[2])
        visible = slot < prefix_len
        if kv_start is not None:
            visible = visible & (slot >= kv_start[:, None])[:, None, None, None, :]  # [B, 1, 1, 1, S]
        s_cache = jnp.where(visible, s_cache, NEG_INF)
        m = jnp.maximum(m, s_cache.max(-1, keepdims=True))
    e_new = jnp.exp(s_new - m)
    denom = e_new.sum(-1, keepdims=True)
    out = jax.lax.dot_general(e_new.reshape(b, kh, g * t, u), vn, pv)  # [B, K, G*T, D]
    if fused:
        scale = jnp.exp(m_c - m)
        denom = denom + l_c * scale
        out = out.reshape(b, kh, g, t, d) + o_c * scale
    elif k_cache is not None:
        e_cache = jnp.exp(s_cache - m)
        denom = denom + e_cache.sum(-1, keepdims=True)
        out = out + jax.lax.dot_general(e_cache.reshape(b, kh, g * t, -1), v_cache, pv)
    out = out.reshape(b, kh, g, t, d) / denom
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n * d)


def self_attention(
    qkv: jax.Array,  # [B, T, (N + 2K) D] the fused projection, before RoPE
    cos: jax.Array,  # [B, T, D/2]
    sin: jax.Array,
    num_kv_heads: int,
    k_cache: jax.Array | None,  # [B, K, S, D] committed keys (read only); None: no prefix
    v_cache: jax.Array | None,
    prefix_len: jax.Array,
    mask: jax.Array,  # [T, P + T] or [B, T, P + T] bool over the lead keys and the new tokens
    lead_k: jax.Array | None = None,  # [B, P, K, D] uncommitted keys before the new tokens
    lead_v: jax.Array | None = None,
    kv_start: jax.Array | None = None,  # [B]
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A layer's attention from its QKV projection: RoPE, then `attention`. Returns `[B, T, N*D]` and the new
    tokens' keys (RoPE'd) and values `[B, T, K, D]` for the caller's cache write.

    With a cache, no lead keys and the kernel available (decode steps, tree verification) the whole of it is one
    call of `kernels.tree_attention`: in XLA it is ~10 small ops per layer whose dispatch costs several times
    their work. Gradients are those of the XLA composition.
    """
    b = qkv.shape[0]
    if (lead_k is None and k_cache is not None and v_cache is not None
            and kernels.supports_tree_attention(qkv, k_cache, v_cache, mask)):
        lo = jnp.zeros((b,), jnp.int32) if kv_start is None else kv_start.astype(jnp.int32)
        hi = jnp.asarray(prefix_len, jnp.int32)
        return jax.lax.platform_dependent(qkv, cos, sin, k_cache, v_cache, lo, hi, mask,
                                          cpu=_kernel_self_attention, default=_xla_self_attention)
    q, k, v = _split_rope(qkv, cos, sin, num_kv_heads)
    k_all = k if lead_k is None else jnp.concatenate([lead_k, k], axis=1)
    v_all = v if lead_v is None else jnp.concatenate([lead_v, v], axis=1)
    return attention(q, k_all, v_all, k_cache, v_cache, prefix_len, mask, kv_start), k, v


def _split_rope(qkv: jax.Array, cos: jax.Array, sin: jax.Array,
                num_kv_heads: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The fused projection `[B, T, (N + 2K) D]` -> RoPE'd q `[B, T, N, D]`, RoPE'd k and v `[B, T, K, D]`."""
    b, t, width = qkv.shape
    d = cos.shape[-1] * 2
    n = width // d - 2 * num_kv_heads
    q, k, v = jnp.split(qkv, [n * d, (n + num_kv_heads) * d], axis=-1)
    return (apply_rope(q.reshape(b, t, n, d), cos, sin), apply_rope(k.reshape(b, t, num_kv_heads, d), cos, sin),
            v.reshape(b, t, num_kv_heads, d))


def _xla_self_attention(qkv: jax.Array, cos: jax.Array, sin: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                        lo: jax.Array, hi: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`kernels.tree_attention`'s XLA equivalent (its gradient, its path off the CPU): `attention` over RoPE'd
    q, k, v (a query that sees no key at all differs: the kernel gives 0)."""
    q, k, v = _split_rope(qkv, cos, sin, k_cache.shape[1])
    return attention(q, k, v, k_cache, v_cache, hi, mask, lo), k, v


@jax.custom_vjp
def _kernel_self_attention(qkv: jax.Array, cos: jax.Array, sin: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                           lo: jax.Array, hi: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    return kernels.tree_attention(qkv, cos, sin, k_cache, v_cache, lo, hi, mask)


def _kernel_self_attention_fwd(*args: jax.Array) -> tuple:
    return _kernel_self_attention(*args), args


def _kernel_self_attention_bwd(res: tuple, g: tuple) -> tuple:
    qkv, cos, sin, k_cache, v_cache, lo, hi, mask = res
    _, vjp = jax.vjp(lambda *a: _xla_self_attention(*a, lo, hi, mask), qkv, cos, sin, k_cache, v_cache)
    return (*vjp(g), None, None, None)


_kernel_self_attention.defvjp(_kernel_self_attention_fwd, _kernel_self_attention_bwd)


def _cache_partial(qh: jax.Array, k: jax.Array, v: jax.Array, lo: jax.Array,
                   hi: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`kernels.cache_attention` on the CPU (XLA's equivalent elsewhere): the softmax state over slots [lo, hi)."""
    return jax.lax.platform_dependent(qh, k, v, lo, hi, cpu=_kernel_cache_partial, default=_xla_cache_partial)


def _xla_cache_partial(qh: jax.Array, k: jax.Array, v: jax.Array, lo: jax.Array,
                       hi: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    slot = jnp.arange(k.shape[2])
    visible = ((slot < hi) & (slot >= lo[:, None]))[:, None, None, :]  # [B, 1, 1, S]
    s = jnp.where(visible, jax.lax.dot_general(qh, k, (((3,), (3,)), ((0, 1), (0, 1)))), NEG_INF)  # [B, K, M, S]
    m = s.max(-1)
    e = jnp.where(visible, jnp.exp(s - m[..., None]), 0.0)  # an empty range: l = 0, o = 0 (m = NEG_INF)
    return m, e.sum(-1), jax.lax.dot_general(e, v, (((3,), (2,)), ((0, 1), (0, 1))))


@jax.custom_vjp
def _kernel_cache_partial(qh: jax.Array, k: jax.Array, v: jax.Array, lo: jax.Array,
                          hi: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    return kernels.cache_attention(qh, k, v, lo, hi)


def _kernel_cache_partial_fwd(qh: jax.Array, k: jax.Array, v: jax.Array, lo: jax.Array, hi: jax.Array) -> tuple:
    return _kernel_cache_partial(qh, k, v, lo, hi), (qh, k, v, lo, hi)


def _kernel_cache_partial_bwd(res: tuple, g: tuple) -> tuple:
    qh, k, v, lo, hi = res
    _, vjp = jax.vjp(lambda a, b, c: _xla_cache_partial(a, b, c, lo, hi), qh, k, v)
    return (*vjp(g), None, None)


_kernel_cache_partial.defvjp(_kernel_cache_partial_fwd, _kernel_cache_partial_bwd)


def swiglu(x: jax.Array, w_gate_up: jax.Array, w_down: jax.Array, in_out: bool = False) -> jax.Array:
    """SwiGLU MLP with gate and up fused in one matmul (`[2F, H]`, or `[H, 2F]` when `in_out`)."""
    gate, up = jnp.split(linear(x, w_gate_up, in_out), 2, axis=-1)
    return linear(jax.nn.silu(gate) * up, w_down, in_out)
