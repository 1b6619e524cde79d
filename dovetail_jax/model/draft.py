"""The draft model: Dynamic Gating Fusion (or EAGLE's fusion) of the target's feature and the next token's
embedding, then a few LLaMA blocks, scored by a frozen copy of the target's LM head.

The draft reads pairs (f_i, t_{i+1}): f_i is the target's final-norm hidden state at position i and t_{i+1}
the token that follows it; its output at i regresses f_{i+1}, and the head turns that into a distribution
over t_{i+2}. During tree expansion the draft feeds its own output back as the feature.

    DGF:   h1 = f W1,  h2 = SiLU(RMSNorm(e) W2),  z = sigmoid([h1; h2] Wz),  x = z * h1 + (1 - z) * h2
    EAGLE: x = [e; f] W + b
    none:  x = e   (a standalone LLaMA used as the draft: the features are ignored)

then `num_layers` LLaMA blocks (the first without its input norm, no final norm; "none" keeps both norms).
The trainable weights (`DraftParams`) are separate from the frozen embedding and head copies
(`DraftShared`), which live on the draft's device and are never trained or stored with the draft. With a
reduced vocabulary the head scores only V' tokens (`vocab_map` maps draft ids to target ids): drafting gets
cheaper, and losslessness does not depend on it (the target verifies every token).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dovetail_jax.config import DraftConfig, ModelConfig
from dovetail_jax.errors import ModelFormatError
from dovetail_jax.model import layers as L
from dovetail_jax.model.block import decoder_layer
from dovetail_jax.model.cache import KVCache, KVUpdate
from dovetail_jax.model.params import (
    LayerParams,
    Layout,
    TargetParams,
    layer_from_tensors,
    layer_shapes,
    layer_to_tensors,
)


@struct.dataclass
class DGFParams:
    emb_norm: jax.Array  # [H]
    w1: jax.Array  # [H, H] (in, out): feature branch
    w2: jax.Array  # [H, H] (in, out): token branch
    wz: jax.Array  # [2H, H] (in, out): the gate over [h1; h2]


@struct.dataclass
class EagleFusionParams:
    w: jax.Array  # [2H, H] (in, out) over [embedding; feature]
    b: jax.Array  # [H]


@struct.dataclass
class DraftParams:
    """The trainable weights of a draft (what a draft checkpoint stores)."""

    fusion: DGFParams | EagleFusionParams | None
    layers: tuple[LayerParams, ...]  # layers[0].attn_norm is None unless fusion == "none"
    final_norm: jax.Array | None  # only for fusion "none"
    layout: Layout = struct.field(pytree_node=False, default="in_out")


@struct.dataclass
class DraftShared:
    """Frozen copies of the target's embedding and LM head on the draft's device."""

    embed: jax.Array  # [V, H]
    head: jax.Array  # [V', H]: the target head's rows `vocab_map` (all V rows without a reduced vocabulary)
    vocab_map: jax.Array | None  # [V'] int32 draft id -> target id; None: identity


def _input_norm(dcfg: DraftConfig, i: int) -> bool:
    """EAGLE/Dovetail drafts drop the first block's input norm (its input is already the fused feature)."""
    return i > 0 or dcfg.fusion == "none"


def draft_model_config(cfg: ModelConfig, dcfg: DraftConfig) -> ModelConfig:
    """Shapes of the draft's blocks: the target's, with the draft's layer count (used to size its KV cache)."""
    return cfg.replace(num_layers=dcfg.num_layers)


# --- forward -------------------------------------------------------------------------------------------------


def fuse(params: DraftParams, dcfg: DraftConfig, cfg: ModelConfig, feats: jax.Array, emb: jax.Array) -> jax.Array:
    """Combine the feature `[B, T, H]` and the embedding `[B, T, H]` into the first block's input."""
    f = params.fusion
    if dcfg.fusion == "dgf":
        assert isinstance(f, DGFParams)
        h1 = feats @ f.w1
        h2 = jax.nn.silu(L.rms_norm(emb, f.emb_norm, cfg.rms_norm_eps) @ f.w2)
        z = jax.nn.sigmoid(jnp.concatenate([h1, h2], axis=-1) @ f.wz)
        return z * h1 + (1.0 - z) * h2
    if dcfg.fusion == "eagle":
        assert isinstance(f, EagleFusionParams)
        return jnp.concatenate([emb, feats], axis=-1) @ f.w + f.b
    return emb


def forward(
    params: DraftParams,
    shared: DraftShared,
    cfg: ModelConfig,
    dcfg: DraftConfig,
    feats: jax.Array,  # [B, T, H] target features (or the draft's own outputs during expansion)
    tokens: jax.Array,  # [B, T] int32 target ids of the following tokens
    positions: jax.Array,  # [B, T] int32
    mask: jax.Array,  # [T, P + T] bool over the lead keys and the new tokens
    cache: KVCache,
    lead: KVUpdate | None = None,  # per layer [B, P, K, D] uncommitted keys/values before the new tokens
    empty_cache: bool = False,
) -> tuple[jax.Array, KVUpdate]:
    """Returns the draft's output features `[B, T, H]` (the input of the head) and the new tokens' K/V.
    `empty_cache=True` (static) promises an empty cache, so attention skips it (a prompt's first tree)."""
    x = fuse(params, dcfg, cfg, feats, jnp.take(shared.embed, tokens, axis=0))
    cos, sin = L.rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
    ks, vs = [], []
    for i, (p, kc, vc) in enumerate(zip(params.layers, cache.k, cache.v, strict=True)):
        if empty_cache:
            kc = vc = None
        x, k, v = decoder_layer(p, cfg, x, cos, sin, kc, vc, cache.length, mask, params.layout == "in_out",
                                None if lead is None else lead.k[i], None if lead is None else lead.v[i])
        ks.append(k)
        vs.append(v)
    if params.final_norm is not None:
        x = L.rms_norm(x, params.final_norm, cfg.rms_norm_eps)
    return x, KVUpdate(k=tuple(ks), v=tuple(vs))


def log_probs(shared: DraftShared, hidden: jax.Array) -> jax.Array:
    """Draft log-probabilities `[..., V']` over the draft vocabulary."""
    return jax.nn.log_softmax(L.linear(hidden, shared.head), axis=-1)


def to_target_ids(shared: DraftShared, draft_ids: jax.Array) -> jax.Array:
    return draft_ids if shared.vocab_map is None else jnp.take(shared.vocab_map, draft_ids)


# --- construction --------------------------------------------------------------------------------------------


def make_shared(target: TargetParams, cfg: ModelConfig, vocab_map: np.ndarray | None = None,
                device: jax.Device | None = None) -> DraftShared:
    """Copy the target's embedding and (rows of) its LM head to the draft's device."""
    head = np.asarray(target.head)
    vm = None
    if vocab_map is not None:
        vm = np.asarray(vocab_map, np.int32)
        bad = vm.ndim != 1 or vm.size == 0 or vm.min() < 0 or vm.max() >= cfg.vocab_size
        if bad or len(np.unique(vm)) != vm.size:
            raise ModelFormatError(f"vocab_map must hold distinct target ids in [0, {cfg.vocab_size})")
        head = head[vm]
    put = (lambda x: jax.device_put(x, device)) if device is not None else jnp.asarray
    return DraftShared(embed=put(np.asarray(target.embed)), head=put(np.ascontiguousarray(head)),
                       vocab_map=None if vm is None else put(vm))


def init_draft(key: jax.Array, cfg: ModelConfig, dcfg: DraftConfig, device: jax.Device | None = None,
               layout: Layout = "in_out") -> DraftParams:
    """A randomly initialised draft: Xavier-uniform fusion (as EAGLE/Dovetail), N(0, 0.02) blocks, unit norms."""
    h = cfg.hidden_size
    keys = iter(jax.random.split(key, 4 + 8 * dcfg.num_layers))

    def xavier(shape: tuple[int, int]) -> np.ndarray:
        lim = np.sqrt(6.0 / (shape[0] + shape[1]))
        return np.asarray(jax.random.uniform(next(keys), shape, jnp.float32, -lim, lim))

    def normal(shape: tuple[int, ...]) -> np.ndarray:
        return np.asarray(0.02 * jax.random.normal(next(keys), shape, jnp.float32))

    tensors: dict[str, np.ndarray] = {}
    if dcfg.fusion == "dgf":
        tensors |= {"emb_norm.weight": np.ones(h, np.float32), "W_1": xavier((h, h)), "W_2": xavier((h, h)),
                    "W_z": xavier((2 * h, h))}
    elif dcfg.fusion == "eagle":
        tensors |= {"fc.weight": xavier((h, 2 * h)), "fc.bias": np.zeros(h, np.float32)}
    else:
        tensors["norm.weight"] = np.ones(h, np.float32)
    for i in range(dcfg.num_layers):
        for name, shape in layer_shapes(cfg, f"layers.{i}.", _input_norm(dcfg, i)).items():
            tensors[name] = np.ones(shape, np.float32) if len(shape) == 1 else normal(shape)
    return draft_params_from_tensors(cfg, dcfg, tensors, device, layout=layout)


def draft_from_lm(
    lm: TargetParams, lm_cfg: ModelConfig, device: jax.Device | None = None, layout: Layout = "in_out",
    num_layers: int | None = None,
) -> tuple[DraftConfig, DraftParams, DraftShared]:
    """Use a whole LLaMA (e.g. a smaller model with the same tokenizer, or the target itself in tests) as
    the draft: fusion "none", its own embedding, blocks, final norm and head, copied to `device`.
    `num_layers` keeps only the first blocks (an early-exit "self-speculative" draft of the target)."""
    n = lm_cfg.num_layers if num_layers is None else num_layers
    if not 1 <= n <= lm_cfg.num_layers:
        raise ValueError(f"num_layers must be in 1..{lm_cfg.num_layers}, got {n}")
    dcfg = DraftConfig(num_layers=n, fusion="none")
    tensors = {"norm.weight": np.asarray(lm.final_norm)}
    for i, p in enumerate(lm.layers[:n]):
        tensors |= layer_to_tensors(p, lm_cfg, f"layers.{i}.", lm.layout)
    params = draft_params_from_tensors(lm_cfg, dcfg, tensors, device, layout=layout)
    return dcfg, params, make_shared(lm, lm_cfg, None, device)


# --- tensors <-> params (the checkpoint format) ---------------------------------------------------------------


def expected_draft_shapes(cfg: ModelConfig, dcfg: DraftConfig) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a draft checkpoint: EAGLE/Dovetail's names, `[out, in]` for the blocks'
    Linear weights and `[in, out]` for W_1, W_2, W_z (so PyTorch checkpoints map without transposes)."""
    h = cfg.hidden_size
    shapes: dict[str, tuple[int, ...]] = {}
    if dcfg.fusion == "dgf":
        shapes |= {"emb_norm.weight": (h,), "W_1": (h, h), "W_2": (h, h), "W_z": (2 * h, h)}
    elif dcfg.fusion == "eagle":
        shapes |= {"fc.weight": (h, 2 * h), "fc.bias": (h,)}
    else:
        shapes["norm.weight"] = (h,)
    for i in range(dcfg.num_layers):
        shapes |= layer_shapes(cfg, f"layers.{i}.", _input_norm(dcfg, i))
    return shapes


def check_draft_tensors(cfg: ModelConfig, dcfg: DraftConfig, tensors: Mapping[str, np.ndarray],
                        source: str = "draft checkpoint") -> None:
    """Refuse a draft that does not match the target: missing, unexpected or mis-shaped tensors, named."""
    want = expected_draft_shapes(cfg, dcfg)
    missing = [k for k in want if k not in tensors]
    extra = sorted(k for k in tensors if k not in want)
    if missing:
        raise ModelFormatError(f"{source}: missing tensor(s) {', '.join(missing[:5])}"
                               f"{' ...' if len(missing) > 5 else ''} for a {dcfg.num_layers}-layer "
                               f"'{dcfg.fusion}' draft of {cfg.name}")
    if extra:
        raise ModelFormatError(f"{source}: unexpected tensor(s) {', '.join(extra[:5])}"
                               f"{' ...' if len(extra) > 5 else ''} for a {dcfg.num_layers}-layer "
                               f"'{dcfg.fusion}' draft of {cfg.name}")
    for k, shape in want.items():
        got = tuple(np.shape(tensors[k]))
        if got != shape:
            raise ModelFormatError(f"{source}: tensor '{k}' has shape {got}, expected {shape} "
                                   f"(hidden size {cfg.hidden_size} of {cfg.name})")


def draft_params_from_tensors(cfg: ModelConfig, dcfg: DraftConfig, tensors: Mapping[str, np.ndarray],
                              device: jax.Device | None = None, source: str = "draft checkpoint",
                              layout: Layout = "in_out") -> DraftParams:
    """Validate strictly (never load a draft partly) and place the float32 weights on `device`."""
    check_draft_tensors(cfg, dcfg, tensors, source)

    def put(x: np.ndarray) -> jax.Array:
        x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
        return jax.device_put(x, device) if device is not None else jnp.asarray(x)

    def t(name: str) -> np.ndarray:
        return np.asarray(tensors[name], dtype=np.float32)

    fusion: DGFParams | EagleFusionParams | None = None
    if dcfg.fusion == "dgf":
        fusion = DGFParams(emb_norm=put(t("emb_norm.weight")), w1=put(t("W_1")), w2=put(t("W_2")), wz=put(t("W_z")))
    elif dcfg.fusion == "eagle":
        fusion = EagleFusionParams(w=put(t("fc.weight").T), b=put(t("fc.bias")))
    layers = [layer_from_tensors(tensors, f"layers.{i}.", put, layout) for i in range(dcfg.num_layers)]
    final_norm = put(t("norm.weight")) if dcfg.fusion == "none" else None
    return DraftParams(fusion=fusion, layers=tuple(layers), final_norm=final_norm, layout=layout)


def draft_tensors(params: DraftParams, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """The inverse of `draft_params_from_tensors`: checkpoint names and layouts, float32 numpy."""
    out: dict[str, np.ndarray] = {}
    f = params.fusion
    if isinstance(f, DGFParams):
        out |= {"emb_norm.weight": f.emb_norm, "W_1": f.w1, "W_2": f.w2, "W_z": f.wz}
    elif isinstance(f, EagleFusionParams):
        out |= {"fc.weight": np.asarray(f.w).T, "fc.bias": f.b}
    if params.final_norm is not None:
        out["norm.weight"] = params.final_norm
    for i, p in enumerate(params.layers):
        out |= layer_to_tensors(p, cfg, f"layers.{i}.", params.layout)
    return {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in out.items()}
