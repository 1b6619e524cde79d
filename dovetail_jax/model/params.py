"""Parameters described once: each pytree leaf declared with the checkpoint tensors it is made of.

Every params class (`LayerParams`, `TargetParams`, and the draft's in `draft.py`) has a `spec` classmethod
returning the same pytree with a `ParamSpec` at each leaf. Everything else is derived from that one
description by the generic functions below: the tensor names and shapes a checkpoint must hold
(`tensor_shapes`), random initialisation (`init_tensors`), conversion between HF-named tensors and the
pytree, both ways (`from_tensors`, `to_tensors`), and placement on a device (`place`).

Loaders (GGUF, HF safetensors) produce float32 numpy arrays under HF names and in HF layout
(`[out_features, in_features]`, q/k rows in HF's rotate-half order). A `ParamSpec` fuses several tensors
(q/k/v, gate/up) by concatenating their output rows, and may hold the transpose: projections come in one of
two layouts chosen per use, since on XLA CPU `[out, in]` made a single-token decode step ~25% faster than
`[in, out]`, while `[in, out]` made 4- to 16-token forwards (tree verification) 12-25% faster. Keeping both
would double the weights, so the caller picks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dovetail_jax import kernels
from dovetail_jax.config import ModelConfig
from dovetail_jax.errors import ModelFormatError

Layout = Literal["out_in", "in_out"]
Init = Literal["ones", "zeros", "normal", "xavier"]  # normal: N(0, 0.02); xavier: uniform, Glorot's bound
Tree = TypeVar("Tree")


def fast_layout(tokens: int) -> Layout:
    """The faster projection layout for forwards over `tokens` tokens on this machine. The compiled kernel
    (`dovetail_jax.kernels`, T <= 32) streams `[out, in]` rows once for all T tokens and is fastest in that
    layout; XLA's own dot, where the kernel cannot run, is faster with `[in, out]` for T >= 2 (README, bench
    forward)."""
    return "out_in" if tokens <= 1 or kernels.kernels_enabled() else "in_out"


# --- the description ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One tensor as a checkpoint stores it: name, shape (`[out, in]` for a Linear weight), initialiser."""

    name: str
    shape: tuple[int, ...]
    init: Init


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One leaf of a params pytree: the stored tensors it is made of, concatenated along their first (output)
    axis (fused q/k/v, gate/up), transposed when `transpose` (a projection in layout "in_out")."""

    parts: tuple[TensorSpec, ...]
    transpose: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        """The leaf's shape in the pytree."""
        stored = (sum(p.shape[0] for p in self.parts), *self.parts[0].shape[1:])
        return stored[::-1] if self.transpose else stored

    def build(self, tensors: Mapping[str, np.ndarray]) -> np.ndarray:
        """The leaf's value (float32, contiguous) from validated tensors."""
        ws = [np.asarray(tensors[p.name], dtype=np.float32) for p in self.parts]
        w = ws[0] if len(ws) == 1 else np.concatenate(ws)
        return np.ascontiguousarray(w.T if self.transpose else w)

    def split(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """The inverse of `build`: the stored tensors (float32, contiguous) of the leaf value `x`."""
        w = np.asarray(x, dtype=np.float32)
        w = w.T if self.transpose else w
        ends = np.cumsum([p.shape[0] for p in self.parts])[:-1]
        return {p.name: np.ascontiguousarray(s) for p, s in zip(self.parts, np.split(w, ends), strict=True)}


def tensor(name: str, shape: tuple[int, ...], init: Init, transpose: bool = False) -> ParamSpec:
    """A leaf stored as one tensor."""
    return ParamSpec((TensorSpec(name, shape, init),), transpose)


def projection(prefix: str, parts: tuple[tuple[str, tuple[int, int]], ...], layout: Layout) -> ParamSpec:
    """A (fused) Linear weight: stored `[out, in]` under HF names, held in `layout`; initialised N(0, 0.02)."""
    return ParamSpec(tuple(TensorSpec(prefix + n, s, "normal") for n, s in parts), transpose=layout == "in_out")


# --- what is derived from it ----------------------------------------------------------------------------------


def param_specs(spec: Any) -> list[ParamSpec]:
    """The leaves of a spec pytree, in pytree order."""
    return jax.tree_util.tree_leaves(spec)


def tensor_specs(spec: Any) -> list[TensorSpec]:
    """The tensors a checkpoint of `spec` holds, in checkpoint order: the model-level ones first, then layer by
    layer, each layer's norms before its projections (the order of the first release, which code that draws
    random weights per name follows)."""
    layers = getattr(spec, "layers", ())
    leaves = param_specs(spec.replace(layers=()) if layers else spec)
    leaves += [p for layer in layers for p in sorted(param_specs(layer), key=lambda p: len(p.shape) > 1)]
    return [t for p in leaves for t in p.parts]


def tensor_shapes(spec: Any) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors a checkpoint of `spec` holds, in checkpoint order."""
    return {t.name: t.shape for t in tensor_specs(spec)}


def init_tensors(spec: Any, key: jax.Array, num_keys: int | None = None) -> dict[str, np.ndarray]:
    """Freshly initialised tensors of `spec` (float32): norms one, biases zero, and each random tensor drawn
    with the next of `num_keys` keys split from `key` (default: one per random tensor), in checkpoint order."""
    specs = tensor_specs(spec)
    n = sum(t.init in ("normal", "xavier") for t in specs) if num_keys is None else num_keys
    keys = iter(jax.random.split(key, n))
    out: dict[str, np.ndarray] = {}
    for t in specs:
        if t.init == "ones":
            out[t.name] = np.ones(t.shape, np.float32)
        elif t.init == "zeros":
            out[t.name] = np.zeros(t.shape, np.float32)
        elif t.init == "normal":
            out[t.name] = np.asarray(0.02 * jax.random.normal(next(keys), t.shape, jnp.float32))
        else:
            lim = np.sqrt(6.0 / (t.shape[0] + t.shape[1]))
            out[t.name] = np.asarray(jax.random.uniform(next(keys), t.shape, jnp.float32, -lim, lim))
    return out


def place(x: np.ndarray | jax.Array, device: jax.Device | None) -> jax.Array:
    """Commit one array to `device` (None: JAX's default device, uncommitted)."""
    return jax.device_put(x, device) if device is not None else jnp.asarray(x)


def from_tensors(spec: Tree, tensors: Mapping[str, np.ndarray], device: jax.Device | None = None) -> Tree:
    """The params pytree of `spec` from its (already validated) tensors, float32, placed on `device`."""
    return jax.tree_util.tree_map(lambda p: place(p.build(tensors), device), spec)


def to_tensors(spec: Any, params: Any) -> dict[str, np.ndarray]:
    """The inverse of `from_tensors`: checkpoint names and layouts, float32 numpy."""
    leaves, treedef = jax.tree_util.tree_flatten(spec)
    out: dict[str, np.ndarray] = {}
    for p, x in zip(leaves, treedef.flatten_up_to(params), strict=True):  # flatten_up_to: same structure
        out |= p.split(np.asarray(x))
    return out


# --- the LLaMA target ---------------------------------------------------------------------------------------


@struct.dataclass
class LayerParams:
    attn_norm: jax.Array | None  # [H]; None in a draft's first block (no input norm)
    wqkv: jax.Array  # [q + 2 kv, H] (out, in), or its transpose with layout "in_out"
    wo: jax.Array  # [H, q]
    mlp_norm: jax.Array  # [H]
    w_gate_up: jax.Array  # [2F, H]
    w_down: jax.Array  # [H, F]

    @classmethod
    def spec(cls, cfg: ModelConfig, prefix: str, layout: Layout, input_norm: bool = True) -> LayerParams:
        """One decoder layer under HF names starting with `prefix`."""
        h, f, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
        return cls(
            attn_norm=tensor(prefix + "input_layernorm.weight", (h,), "ones") if input_norm else None,
            wqkv=projection(prefix, (("self_attn.q_proj.weight", (q, h)), ("self_attn.k_proj.weight", (kv, h)),
                                     ("self_attn.v_proj.weight", (kv, h))), layout),
            wo=projection(prefix, (("self_attn.o_proj.weight", (h, q)),), layout),
            mlp_norm=tensor(prefix + "post_attention_layernorm.weight", (h,), "ones"),
            w_gate_up=projection(prefix, (("mlp.gate_proj.weight", (f, h)), ("mlp.up_proj.weight", (f, h))), layout),
            w_down=projection(prefix, (("mlp.down_proj.weight", (h, f)),), layout),
        )


@struct.dataclass
class TargetParams:
    embed: jax.Array  # [V, H]
    layers: tuple[LayerParams, ...]
    final_norm: jax.Array  # [H]
    lm_head: jax.Array | None  # [V, H] whatever the layout; None when tied to `embed`
    layout: Layout = struct.field(pytree_node=False, default="out_in")  # of the layer projections

    @property
    def head(self) -> jax.Array:
        return self.embed if self.lm_head is None else self.lm_head

    @classmethod
    def spec(cls, cfg: ModelConfig, layout: Layout = "out_in") -> TargetParams:
        """A HF LLaMA checkpoint of `cfg`, with the layer projections in `layout`."""
        v, h = cfg.vocab_size, cfg.hidden_size
        return cls(
            embed=tensor("model.embed_tokens.weight", (v, h), "normal"),
            layers=tuple(LayerParams.spec(cfg, f"model.layers.{i}.", layout) for i in range(cfg.num_layers)),
            final_norm=tensor("model.norm.weight", (h,), "ones"),
            lm_head=None if cfg.tie_word_embeddings else tensor("lm_head.weight", (v, h), "normal"),
            layout=layout,
        )


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor names and shapes a checkpoint of `cfg` must provide."""
    return tensor_shapes(TargetParams.spec(cfg))


def check_tensors(cfg: ModelConfig, tensors: Mapping[str, np.ndarray], source: str = "checkpoint") -> None:
    """Raise ModelFormatError naming the first missing or mis-shaped tensor."""
    for name, shape in expected_shapes(cfg).items():
        if name not in tensors:
            raise ModelFormatError(f"{source}: missing tensor '{name}' (expected shape {shape})")
        got = tuple(tensors[name].shape)
        if got != shape:
            raise ModelFormatError(f"{source}: tensor '{name}' has shape {got}, expected {shape}")


def params_from_tensors(
    cfg: ModelConfig,
    tensors: Mapping[str, np.ndarray],
    device: jax.Device | None = None,
    source: str = "checkpoint",
    layout: Layout = "out_in",
) -> TargetParams:
    """Validate, fuse and place the target's weights (float32) on `device`, projections in `layout`."""
    if layout not in ("out_in", "in_out"):
        raise ValueError(f"layout must be 'out_in' or 'in_out', got {layout!r}")
    check_tensors(cfg, tensors, source)
    return from_tensors(TargetParams.spec(cfg, layout), tensors, device)


def weight_bytes(params: TargetParams) -> int:
    """Bytes of weights one decode step reads (layers, final norm, LM head; not the embedding rows)."""
    leaves = jax.tree_util.tree_leaves(params.layers) + [params.final_norm, params.head]
    return sum(int(x.size) * x.dtype.itemsize for x in leaves)
