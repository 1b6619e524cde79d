"""Target parameters as a pytree, built from a name -> array mapping in Hugging Face LLaMA naming.

Loaders (GGUF, HF safetensors) produce float32 numpy arrays under HF names and in HF layout
(`[out_features, in_features]`, q/k rows in HF's rotate-half order). This module checks every
tensor's presence and shape (naming the culprit), fuses q/k/v and gate/up, and commits the
result to one device, in one of two layouts chosen per use: on XLA CPU `[out, in]` made a single-token
decode step ~25% faster than `[in, out]`, while `[in, out]` made 4- to 16-token forwards (tree
verification) 12-25% faster. Keeping both would double the weights, so the caller picks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dovetail_jax.config import ModelConfig
from dovetail_jax.errors import ModelFormatError

Layout = Literal["out_in", "in_out"]


@struct.dataclass
class LayerParams:
    attn_norm: jax.Array | None  # [H]; None in a draft's first block (no input norm)
    wqkv: jax.Array  # [q + 2 kv, H] (out, in), or its transpose with layout "in_out"
    wo: jax.Array  # [H, q]
    mlp_norm: jax.Array  # [H]
    w_gate_up: jax.Array  # [2F, H]
    w_down: jax.Array  # [H, F]


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


def layer_shapes(cfg: ModelConfig, prefix: str, input_norm: bool = True) -> dict[str, tuple[int, ...]]:
    """HF names and shapes of one decoder layer's tensors (`[out, in]` projections)."""
    h, f = cfg.hidden_size, cfg.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {prefix + "input_layernorm.weight": (h,)} if input_norm else {}
    return shapes | {
        prefix + "post_attention_layernorm.weight": (h,),
        prefix + "self_attn.q_proj.weight": (cfg.q_size, h),
        prefix + "self_attn.k_proj.weight": (cfg.kv_size, h),
        prefix + "self_attn.v_proj.weight": (cfg.kv_size, h),
        prefix + "self_attn.o_proj.weight": (h, cfg.q_size),
        prefix + "mlp.gate_proj.weight": (f, h),
        prefix + "mlp.up_proj.weight": (f, h),
        prefix + "mlp.down_proj.weight": (h, f),
    }


def layer_from_tensors(tensors: Mapping[str, np.ndarray], prefix: str, put: Callable[[np.ndarray], jax.Array],
                       layout: Layout) -> LayerParams:
    """Fuse q/k/v and gate/up of one layer and place it; no input norm when its tensor is absent."""
    orient = (lambda w: w.T) if layout == "in_out" else (lambda w: w)

    def t(name: str) -> np.ndarray:
        return np.asarray(tensors[prefix + name], dtype=np.float32)

    qkv = np.concatenate([t("self_attn.q_proj.weight"), t("self_attn.k_proj.weight"), t("self_attn.v_proj.weight")])
    gate_up = np.concatenate([t("mlp.gate_proj.weight"), t("mlp.up_proj.weight")])
    return LayerParams(
        attn_norm=put(t("input_layernorm.weight")) if prefix + "input_layernorm.weight" in tensors else None,
        wqkv=put(orient(qkv)),
        wo=put(orient(t("self_attn.o_proj.weight"))),
        mlp_norm=put(t("post_attention_layernorm.weight")),
        w_gate_up=put(orient(gate_up)),
        w_down=put(orient(t("mlp.down_proj.weight"))),
    )


def layer_to_tensors(p: LayerParams, cfg: ModelConfig, prefix: str, layout: Layout) -> dict[str, np.ndarray]:
    """The inverse of `layer_from_tensors`: HF names, `[out, in]`, float32 numpy."""
    orient = (lambda w: w.T) if layout == "in_out" else (lambda w: w)
    q, kv = cfg.q_size, cfg.kv_size
    qkv = orient(np.asarray(p.wqkv))
    gate, up = np.split(orient(np.asarray(p.w_gate_up)), 2, axis=0)
    out = {} if p.attn_norm is None else {prefix + "input_layernorm.weight": np.asarray(p.attn_norm)}
    out |= {
        prefix + "post_attention_layernorm.weight": np.asarray(p.mlp_norm),
        prefix + "self_attn.q_proj.weight": qkv[:q], prefix + "self_attn.k_proj.weight": qkv[q:q + kv],
        prefix + "self_attn.v_proj.weight": qkv[q + kv:], prefix + "self_attn.o_proj.weight": orient(np.asarray(p.wo)),
        prefix + "mlp.gate_proj.weight": gate, prefix + "mlp.up_proj.weight": up,
        prefix + "mlp.down_proj.weight": orient(np.asarray(p.w_down)),
    }
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor names and shapes a checkpoint of `cfg` must provide."""
    h = cfg.hidden_size
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (cfg.vocab_size, h),
        "model.norm.weight": (h,),
    }
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_layers):
        shapes |= layer_shapes(cfg, f"model.layers.{i}.")
    return shapes


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

    def put(x: np.ndarray) -> jax.Array:
        x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
        return jax.device_put(x, device) if device is not None else jnp.asarray(x)

    def t(name: str) -> np.ndarray:
        return np.asarray(tensors[name], dtype=np.float32)

    layers = [layer_from_tensors(tensors, f"model.layers.{i}.", put, layout) for i in range(cfg.num_layers)]
    lm_head = None if cfg.tie_word_embeddings else put(t("lm_head.weight"))
    return TargetParams(
        embed=put(t("model.embed_tokens.weight")),
        layers=tuple(layers),
        final_norm=put(t("model.norm.weight")),
        lm_head=lm_head,
        layout=layout,
    )


def weight_bytes(params: TargetParams) -> int:
    """Bytes of weights one decode step reads (layers, final norm, LM head; not the embedding rows)."""
    leaves = jax.tree_util.tree_leaves(params.layers) + [params.final_norm, params.head]
    return sum(int(x.size) * x.dtype.itemsize for x in leaves)
