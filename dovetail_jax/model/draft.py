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

Each fusion kind is one `FusionSpec` in `FUSIONS`; `DraftParams.spec` turns it into the one description of a
draft's tensors (see `params.py`), from which initialisation, checkpoint validation and conversion derive.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dovetail_jax.config import DraftConfig, ModelConfig
from dovetail_jax.errors import ModelFormatError
from dovetail_jax.model import layers as L
from dovetail_jax.model import quant
from dovetail_jax.model.block import run_layers
from dovetail_jax.model.cache import KVCache, KVUpdate
from dovetail_jax.model.params import (
    LayerParams,
    Layout,
    TargetParams,
    fast_layout,
    from_tensors,
    init_tensors,
    place,
    tensor,
    tensor_shapes,
    to_tensors,
)

# --- the fusions ---------------------------------------------------------------------------------------------


@struct.dataclass
class DGFParams:
    emb_norm: jax.Array  # [H]
    w1: jax.Array  # [H, H] (in, out): feature branch
    w2: jax.Array  # [H, H] (in, out): token branch
    wz: jax.Array  # [2H, H] (in, out): the gate over [h1; h2]

    @classmethod
    def spec(cls, cfg: ModelConfig) -> DGFParams:
        """Dovetail's names; W_1, W_2, W_z are stored `[in, out]` as the official code keeps them."""
        h = cfg.hidden_size
        return cls(emb_norm=tensor("emb_norm.weight", (h,), "ones"), w1=tensor("W_1", (h, h), "xavier"),
                   w2=tensor("W_2", (h, h), "xavier"), wz=tensor("W_z", (2 * h, h), "xavier"))

    def fuse(self, cfg: ModelConfig, feats: jax.Array, emb: jax.Array) -> jax.Array:
        # `L.linear`, not `@`: drafting's few rows then go to the compiled kernel like the blocks' projections
        h1 = L.linear(feats, self.w1, in_out=True)
        h2 = jax.nn.silu(L.linear(L.rms_norm(emb, self.emb_norm, cfg.rms_norm_eps), self.w2, in_out=True))
        z = jax.nn.sigmoid(L.linear(jnp.concatenate([h1, h2], axis=-1), self.wz, in_out=True))
        return z * h1 + (1.0 - z) * h2


@struct.dataclass
class EagleFusionParams:
    w: jax.Array  # [2H, H] (in, out) over [embedding; feature]
    b: jax.Array  # [H]

    @classmethod
    def spec(cls, cfg: ModelConfig) -> EagleFusionParams:
        """EAGLE's `fc`, a torch Linear(2H -> H): stored `[out, in]`, held `[in, out]`."""
        h = cfg.hidden_size
        return cls(w=tensor("fc.weight", (h, 2 * h), "xavier", transpose=True), b=tensor("fc.bias", (h,), "zeros"))

    def fuse(self, cfg: ModelConfig, feats: jax.Array, emb: jax.Array) -> jax.Array:
        return L.linear(jnp.concatenate([emb, feats], axis=-1), self.w, in_out=True) + self.b


@dataclasses.dataclass(frozen=True)
class FusionSpec:
    """What a fusion kind changes in a draft: its fusion weights (None: the embedding goes in as it is), and
    which norms its blocks keep. EAGLE/Dovetail drafts drop the first block's input norm (its input is already
    the fused feature) and have no final norm; a standalone LLaMA keeps both."""

    params: type[DGFParams] | type[EagleFusionParams] | None
    first_input_norm: bool
    final_norm: bool


FUSIONS: dict[str, FusionSpec] = {
    "dgf": FusionSpec(DGFParams, first_input_norm=False, final_norm=False),
    "eagle": FusionSpec(EagleFusionParams, first_input_norm=False, final_norm=False),
    "none": FusionSpec(None, first_input_norm=True, final_norm=True),
}


# --- the draft's parameters -----------------------------------------------------------------------------------


@struct.dataclass
class DraftParams:
    """The trainable weights of a draft (what a draft checkpoint stores)."""

    fusion: DGFParams | EagleFusionParams | None
    layers: tuple[LayerParams, ...]  # layers[0].attn_norm is None unless fusion == "none"
    final_norm: jax.Array | None  # only for fusion "none"
    layout: Layout = struct.field(pytree_node=False, default="in_out")
    # multi-layer features (`DraftConfig.feature_layers`): the target blocks read, their `[k * H, H]` (in, out)
    # projection to one feature and its RMSNorm weight `[H]`; None / () for a final-norm-feature draft
    feature_fc: jax.Array | None = None
    feature_norm: jax.Array | None = None
    feature_layers: tuple[int, ...] = struct.field(pytree_node=False, default=())

    @classmethod
    def spec(cls, cfg: ModelConfig, dcfg: DraftConfig, layout: Layout = "in_out") -> DraftParams:
        """A draft checkpoint: the fusion's tensors (`norm.weight`, the final norm, for fusion "none"), then the
        blocks, named `layers.{i}.` + HF LLaMA's names; with feature layers, EAGLE-3's `fc` over them, stored as
        a torch Linear (`[out, in]`) under `feature_fc.weight`, and the RMSNorm after it (`feature_norm.weight`:
        the blocks' outputs carry SmolLM2's |x| ~ 2e4 activations, the fusion expects a final-norm-sized feature)."""
        kind = FUSIONS[dcfg.fusion]
        h, k = cfg.hidden_size, len(dcfg.feature_layers)
        return cls(
            fusion=None if kind.params is None else kind.params.spec(cfg),
            layers=tuple(LayerParams.spec(cfg, f"layers.{i}.", layout, input_norm=i > 0 or kind.first_input_norm)
                         for i in range(dcfg.num_layers)),
            final_norm=tensor("norm.weight", (cfg.hidden_size,), "ones") if kind.final_norm else None,
            layout=layout,
            feature_fc=tensor("feature_fc.weight", (h, k * h), "xavier", transpose=True) if k else None,
            feature_norm=tensor("feature_norm.weight", (h,), "ones") if k else None,
            feature_layers=dcfg.feature_layers,
        )

    @property
    def fusion_kind(self) -> str:
        """The `DraftConfig.fusion` these weights are for."""
        cls = None if self.fusion is None else type(self.fusion)
        return next(name for name, f in FUSIONS.items() if f.params is cls)


@struct.dataclass
class DraftShared:
    """Frozen copies of the target's embedding and LM head on the draft's device."""

    embed: jax.Array  # [V, H]
    head: jax.Array | quant.Int8Weight  # [V', H]: the target head's rows `vocab_map` (all V rows without a
    #   reduced vocabulary)
    vocab_map: jax.Array | None  # [V'] int32 draft id -> target id; None: identity


def draft_model_config(cfg: ModelConfig, dcfg: DraftConfig) -> ModelConfig:
    """Shapes of the draft's blocks: the target's, with the draft's layer count (used to size its KV cache)."""
    return cfg.replace(num_layers=dcfg.num_layers)


# --- forward -------------------------------------------------------------------------------------------------


def fuse(params: DraftParams, cfg: ModelConfig, feats: jax.Array, emb: jax.Array) -> jax.Array:
    """Combine the feature `[B, T, H]` and the embedding `[B, T, H]` into the first block's input. A
    multi-layer-feature draft first projects the target's `[B, T, k * H]` features to `H` and normalises them;
    its own outputs (`H` wide: tree expansion, training-time test) go in as they are."""
    if params.feature_fc is not None and feats.shape[-1] != cfg.hidden_size:
        feats = L.rms_norm(L.linear(feats, params.feature_fc, in_out=True), params.feature_norm, cfg.rms_norm_eps)
    return emb if params.fusion is None else params.fusion.fuse(cfg, feats, emb)


def forward(
    params: DraftParams,
    shared: DraftShared,
    cfg: ModelConfig,
    dcfg: DraftConfig,
    feats: jax.Array,  # [B, T, H] target features ([B, T, k * H] with feature layers), or the draft's own outputs
    tokens: jax.Array,  # [B, T] int32 target ids of the following tokens
    positions: jax.Array,  # [B, T] int32
    mask: jax.Array,  # [T, P + T] bool over the lead keys and the new tokens
    cache: KVCache,
    lead: KVUpdate | None = None,  # per layer [B, P, K, D] uncommitted keys/values before the new tokens
    empty_cache: bool = False,
) -> tuple[jax.Array, KVUpdate]:
    """Returns the draft's output features `[B, T, H]` (the input of the head) and the new tokens' K/V.
    `empty_cache=True` (static) promises an empty cache, so attention skips it (a prompt's first tree).
    `dcfg` must be the config `params` were made for (the weights themselves say which fusion runs)."""
    x = fuse(params, cfg, feats, jnp.take(shared.embed, tokens, axis=0))
    x, update, _ = run_layers(params.layers, cfg, params.layout, x, positions, mask, cache, empty_cache, lead=lead)
    if params.final_norm is not None:
        x = L.rms_norm(x, params.final_norm, cfg.rms_norm_eps)
    return x, update


def log_probs(shared: DraftShared, hidden: jax.Array) -> jax.Array:
    """Draft log-probabilities `[..., V']` over the draft vocabulary."""
    return jax.nn.log_softmax(L.linear(hidden, shared.head), axis=-1)


def top_log_probs(shared: DraftShared, hidden: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The `k` most likely draft ids `[..., k]` (descending) and their log-probabilities: `top_k(log_probs)`
    with the same values, bit for bit, as `log_softmax` computes them ((x - max) - log sum exp(x - max)),
    but ranked on the logits and normalised only for the k winners (drafting's hot path: no `[..., V']`
    log-probability array, and a cheaper top-k)."""
    logits = L.linear(hidden, shared.head)
    m = jnp.max(logits, axis=-1, keepdims=True)
    lse = jnp.log(jnp.sum(jnp.exp(logits - m), axis=-1, keepdims=True))
    top, ids = jax.lax.top_k(logits, k)
    return (top - m) - lse, ids


def to_target_ids(shared: DraftShared, draft_ids: jax.Array) -> jax.Array:
    return draft_ids if shared.vocab_map is None else jnp.take(shared.vocab_map, draft_ids)


# --- construction --------------------------------------------------------------------------------------------


def make_shared(target: TargetParams, cfg: ModelConfig, vocab_map: np.ndarray | None = None,
                device: jax.Device | None = None, head_dtype: str = "float32") -> DraftShared:
    """Copy the target's embedding and (rows of) its LM head to the draft's device.

    `head_dtype` "bfloat16" rounds the head rows to bfloat16 once, here: the head is the largest matrix a draft
    forward streams, and `layers.linear` reads a bf16 head in half the bytes and widens it exactly (f32 logits);
    "int8" quantizes them per row (`quant.Int8Weight`, a quarter of the bytes). Only which tokens the draft
    proposes can change, never the output (the target verifies). Inference only: training keeps the float32
    default. The embedding stays float32 (a few rows are gathered, not streamed)."""
    if head_dtype not in ("float32", "bfloat16", "int8"):
        raise ValueError(f"head_dtype must be 'float32', 'bfloat16' or 'int8', got {head_dtype!r}")
    head = np.asarray(target.head)
    vm = None
    if vocab_map is not None:
        vm = np.asarray(vocab_map, np.int32)
        bad = vm.ndim != 1 or vm.size == 0 or vm.min() < 0 or vm.max() >= cfg.vocab_size
        if bad or len(np.unique(vm)) != vm.size:
            raise ModelFormatError(f"vocab_map must hold distinct target ids in [0, {cfg.vocab_size})")
        head = head[vm]
    if head_dtype == "bfloat16":
        head = head.astype(jnp.bfloat16)  # round to nearest even, once
    head = quant.quantize(head, False, device) if head_dtype == "int8" else place(np.ascontiguousarray(head), device)
    return DraftShared(embed=place(np.asarray(target.embed), device), head=head,
                       vocab_map=None if vm is None else place(vm, device))


def quantize_matrices(params: DraftParams, device: jax.Device | None = None) -> DraftParams:
    """The draft with every matrix of its own that a forward streams as a `quant.Int8Weight` (per-output int8):
    the fusion's and the blocks' projections; norms and the EAGLE bias stay. Half the bytes of bf16 weights (a
    draft step after a verification reads them back from DRAM: `analysis/profile_decode_cycle.py`). Inference
    only: no gradient, not saved. The head copy is `make_shared(head_dtype="int8")`."""
    def q(w: jax.Array, in_out: bool) -> quant.Int8Weight:
        return w if isinstance(w, quant.Int8Weight) else quant.quantize(w, in_out, device)

    fusion = params.fusion
    if params.feature_fc is not None:
        params = params.replace(feature_fc=q(params.feature_fc, True))
    if isinstance(fusion, DGFParams):
        fusion = fusion.replace(w1=q(fusion.w1, True), w2=q(fusion.w2, True), wz=q(fusion.wz, True))
    elif isinstance(fusion, EagleFusionParams):
        fusion = fusion.replace(w=q(fusion.w, True))
    io = params.layout == "in_out"
    layers = tuple(lp.replace(wqkv=q(lp.wqkv, io), wo=q(lp.wo, io), w_gate_up=q(lp.w_gate_up, io),
                              w_down=q(lp.w_down, io)) for lp in params.layers)
    return params.replace(fusion=fusion, layers=layers)


def init_draft(key: jax.Array, cfg: ModelConfig, dcfg: DraftConfig, device: jax.Device | None = None,
               layout: Layout | None = None) -> DraftParams:
    """A randomly initialised draft: Xavier-uniform fusion (as EAGLE/Dovetail), N(0, 0.02) blocks, unit norms.
    `layout` None: the faster one for the draft's multi-token forwards here (`params.fast_layout`)."""
    spec = DraftParams.spec(cfg, dcfg, layout or fast_layout(2))
    # `key` is split in 4 + 8 per layer (more than are drawn), as since the first release: a seed's draft is stable.
    return from_tensors(spec, init_tensors(spec, key, num_keys=4 + 8 * dcfg.num_layers), device)


def deepen(params: DraftParams, fresh: DraftParams) -> DraftParams:
    """A trained draft grown to `fresh`'s depth: `params`' fusion and blocks, then `fresh`'s extra blocks with
    their output projections (`wo`, `w_down`) zeroed. Each new block then adds nothing to the residual stream,
    so the deeper draft computes exactly what `params` does and training grows the new blocks from there (a
    warm start for more layers, as zero-initialised residual branches in ReZero / Fixup)."""
    n = len(params.layers)
    if fresh.fusion_kind != params.fusion_kind or len(fresh.layers) < n or fresh.layout != params.layout:
        raise ValueError(f"cannot grow a {n}-layer {params.fusion_kind} draft ({params.layout}) into a "
                         f"{len(fresh.layers)}-layer {fresh.fusion_kind} one ({fresh.layout})")
    extra = tuple(lp.replace(wo=jnp.zeros_like(lp.wo), w_down=jnp.zeros_like(lp.w_down)) for lp in fresh.layers[n:])
    return params.replace(layers=tuple(params.layers) + extra)


def draft_from_lm(
    lm: TargetParams, lm_cfg: ModelConfig, device: jax.Device | None = None, layout: Layout | None = None,
    num_layers: int | None = None,
) -> tuple[DraftConfig, DraftParams, DraftShared]:
    """Use a whole LLaMA (e.g. a smaller model with the same tokenizer, or the target itself in tests) as
    the draft: fusion "none", its own embedding, blocks, final norm and head, copied to `device`.
    `num_layers` keeps only the first blocks (an early-exit "self-speculative" draft of the target)."""
    n = lm_cfg.num_layers if num_layers is None else num_layers
    if not 1 <= n <= lm_cfg.num_layers:
        raise ValueError(f"num_layers must be in 1..{lm_cfg.num_layers}, got {n}")
    dcfg = DraftConfig(num_layers=n, fusion="none")
    # The LM's own weights already form a fusion-"none" draft in its layout; convert it to `layout` on `device`.
    as_draft = DraftParams(fusion=None, layers=lm.layers[:n], final_norm=lm.final_norm, layout=lm.layout)
    tensors = to_tensors(DraftParams.spec(lm_cfg, dcfg, lm.layout), as_draft)
    params = from_tensors(DraftParams.spec(lm_cfg, dcfg, layout or fast_layout(2)), tensors, device)
    return dcfg, params, make_shared(lm, lm_cfg, None, device)


# --- tensors <-> params (the checkpoint format) ---------------------------------------------------------------


def expected_draft_shapes(cfg: ModelConfig, dcfg: DraftConfig) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a draft checkpoint: EAGLE/Dovetail's names, `[out, in]` for the blocks'
    Linear weights and `[in, out]` for W_1, W_2, W_z (so PyTorch checkpoints map without transposes)."""
    return tensor_shapes(DraftParams.spec(cfg, dcfg))


def check_draft_tensors(cfg: ModelConfig, dcfg: DraftConfig, tensors: Mapping[str, np.ndarray],
                        source: str = "draft checkpoint") -> None:
    """Refuse a draft that does not match the target: missing, unexpected or mis-shaped tensors, named."""
    want = expected_draft_shapes(cfg, dcfg)
    missing = [k for k in want if k not in tensors]
    extra = sorted(k for k in tensors if k not in want)
    for problem, names in (("missing", missing), ("unexpected", extra)):
        if names:
            raise ModelFormatError(f"{source}: {problem} tensor(s) {', '.join(names[:5])}"
                                   f"{' ...' if len(names) > 5 else ''} for a {dcfg.num_layers}-layer "
                                   f"'{dcfg.fusion}' draft of {cfg.name}")
    for k, shape in want.items():
        got = tuple(np.shape(tensors[k]))
        if got != shape:
            raise ModelFormatError(f"{source}: tensor '{k}' has shape {got}, expected {shape} "
                                   f"(hidden size {cfg.hidden_size} of {cfg.name})")


def draft_params_from_tensors(cfg: ModelConfig, dcfg: DraftConfig, tensors: Mapping[str, np.ndarray],
                              device: jax.Device | None = None, source: str = "draft checkpoint",
                              layout: Layout | None = None, keep_bf16: bool = False) -> DraftParams:
    """Validate strictly (never load a draft partly) and place the weights on `device` (`layout` None:
    `params.fast_layout` for the draft's multi-token forwards), float32; with `keep_bf16`, each matrix (fusion
    and block projections) whose every value is a bfloat16 (a bf16 checkpoint's) is placed as bfloat16: the
    same values in half the bytes, which `layers.linear` reads as such (bit-identical results, a cheaper draft
    forward). Norms and biases stay float32. Inference only: training wants float32 weights."""
    check_draft_tensors(cfg, dcfg, tensors, source)
    spec = DraftParams.spec(cfg, dcfg, layout or fast_layout(2))
    if not keep_bf16:
        return from_tensors(spec, tensors, device)
    return jax.tree_util.tree_map(lambda p: place(_bf16_if_exact(p.build(tensors)), device), spec)


def _bf16_if_exact(w: np.ndarray) -> np.ndarray:
    """`w` as bfloat16 if it is a matrix that bfloat16 holds exactly (no value changes), else `w` unchanged."""
    if w.ndim != 2:
        return w
    b = w.astype(jnp.bfloat16)
    return b if np.array_equal(b.astype(np.float32), w) else w


def upcast_params(params: DraftParams) -> DraftParams:
    """The same draft with every bfloat16 weight as float32 (exact): what training and A/B references use."""
    return jax.tree_util.tree_map(lambda x: x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x, params)


def draft_tensors(params: DraftParams, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """The inverse of `draft_params_from_tensors`: checkpoint names and layouts, float32 numpy."""
    dcfg = DraftConfig(num_layers=len(params.layers), fusion=params.fusion_kind, feature_layers=params.feature_layers)
    return to_tensors(DraftParams.spec(cfg, dcfg, params.layout), params)


# --- a draft ready to run ------------------------------------------------------------------------------------

DraftKind = Literal["trained", "random", "standalone", "self"]


@dataclasses.dataclass(frozen=True)
class Draft:
    """A draft ready to run: its architecture, trainable weights and frozen embedding/head copies, all on the
    draft's device. `source` says where it came from for people (a path, "random (seed 0)"); `kind` says it
    for code: "trained" (a draft checkpoint), "random" (untrained weights: lossless, but few drafts are
    accepted), "standalone" (a whole smaller LLaMA) or "self" (the target itself, fusion "none")."""

    cfg: DraftConfig
    params: DraftParams
    shared: DraftShared
    source: str = "random"
    kind: DraftKind = "random"

    @property
    def is_random(self) -> bool:
        return self.kind == "random"
