"""Model and decoding configurations as frozen dataclasses.

No JAX import here: the simulator imports this module for model, draft and tree shapes and must run without JAX.
Invalid values raise `ConfigError`, the one error type for bad configurations in the library and the simulator.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Literal

from dovetail_jax.errors import ConfigError

SEED_RANGE = (-(2**63), 2**63)  # what a JAX key takes


def _check_int(owner: str, name: str, v: object) -> None:
    """An integer option must be an integer (numpy's too), never a float or bool that would pass a comparison."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise ConfigError(f"{owner}.{name} must be an integer, got {v!r}")


def _check_number(owner: str, name: str, v: object) -> None:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise ConfigError(f"{owner}.{name} must be a number, got {v!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and hyper-parameters of a LLaMA-family decoder (hashable: a static jit argument)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    name: str = "llama"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads", "head_dim", "max_position_embeddings"):
            _check_int("ModelConfig", f, getattr(self, f))
            if getattr(self, f) <= 0:
                raise ConfigError(f"ModelConfig.{f} must be positive, got {getattr(self, f)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        for f in ("rope_theta", "rms_norm_eps"):
            _check_number("ModelConfig", f, getattr(self, f))
        if self.bos_token_id is not None:
            _check_int("ModelConfig", "bos_token_id", self.bos_token_id)
        if not isinstance(self.eos_token_ids, tuple):  # hashable: the config is a static jit argument
            raise ConfigError(f"ModelConfig.eos_token_ids must be a tuple of integers, got {self.eos_token_ids!r}")
        for i in self.eos_token_ids:
            _check_int("ModelConfig", "eos_token_ids", i)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder layer (attention, MLP and its two norms)."""
        h = self.hidden_size
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        mlp = 3 * h * self.intermediate_size
        return attn + mlp + 2 * h

    @property
    def num_params(self) -> int:
        emb = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else emb
        return emb + head + self.num_layers * self.layer_params + self.hidden_size

    def kv_bytes_per_token(self, dtype_bytes: int = 4) -> int:
        """Bytes of K and V cache one token occupies across all layers."""
        return 2 * self.num_layers * self.kv_size * dtype_bytes

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen from the target's logits (used identically everywhere).

    temperature == 0 means greedy. top_k == 0 disables top-k; top_p == 1 disables nucleus filtering.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        for f in ("temperature", "top_p"):
            _check_number("SamplingConfig", f, getattr(self, f))
        for f in ("top_k", "seed"):
            _check_int("SamplingConfig", f, getattr(self, f))
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ConfigError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if not SEED_RANGE[0] <= self.seed < SEED_RANGE[1]:
            raise ConfigError(f"seed must be in [-2^63, 2^63), got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def filtered(self) -> bool:
        """Top-k or top-p in play: only then does sampling need a sort of the vocabulary (a static path)."""
        return self.top_k > 0 or self.top_p < 1.0


# Public configs of well-known models (shapes only), used by the simulator and for documentation.
SMOLLM2_135M = ModelConfig(
    name="SmolLM2-135M-Instruct", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
    num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0, rms_norm_eps=1e-5,
    max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,),
)
LLAMA2_7B = ModelConfig(
    name="Llama-2-7b", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
    num_heads=32, num_kv_heads=32, head_dim=128, rope_theta=10000.0, rms_norm_eps=1e-5,
    max_position_embeddings=4096, bos_token_id=1, eos_token_ids=(2,),
)
LLAMA2_13B = ModelConfig(
    name="Llama-2-13b", vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_layers=40,
    num_heads=40, num_kv_heads=40, head_dim=128, rope_theta=10000.0, rms_norm_eps=1e-5,
    max_position_embeddings=4096, bos_token_id=1, eos_token_ids=(2,),
)
LLAMA3_8B = ModelConfig(
    name="Llama-3-8B", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
    num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0, rms_norm_eps=1e-5,
    max_position_embeddings=8192, bos_token_id=128000, eos_token_ids=(128001, 128009),
)
KNOWN_MODELS: dict[str, ModelConfig] = {
    "smollm2-135m": SMOLLM2_135M,
    "llama2-7b": LLAMA2_7B,
    "llama2-13b": LLAMA2_13B,
    "llama3-8b": LLAMA3_8B,
}


Fusion = Literal["dgf", "eagle", "none"]


@dataclass(frozen=True)
class DraftConfig:
    """Architecture of a draft; its decoder blocks take their shapes from the target's `ModelConfig`.

    fusion: "dgf" (Dovetail's Dynamic Gating Fusion of the target feature and the token embedding), "eagle"
    (EAGLE's one linear layer over [embedding; feature], with bias) or "none" (a standalone LM draft that
    reads only tokens: every block has its input norm and the output goes through a final norm).
    draft_vocab_size: score only the V' most frequent tokens in the draft's head (None: the full vocabulary).
    feature_layers: the target blocks (0-based) whose outputs the draft reads side by side, through its own
    `len(feature_layers) * H -> H` projection, as EAGLE-3 does (`eagle3_feature_layers` picks its low, middle
    and high blocks); () (the default): the target's final-norm feature, as EAGLE-1/2 and Dovetail do. During
    tree expansion and training-time test the draft reads its own `H` outputs either way.
    """

    num_layers: int = 1
    fusion: Fusion = "dgf"
    draft_vocab_size: int | None = None
    feature_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        # types first, so a "2", 1.5 or True meets one ConfigError naming the field here, not a TypeError (or a
        # silently truncated layer count) deep inside the model code
        _check_int("DraftConfig", "num_layers", self.num_layers)
        if self.num_layers < 1:
            raise ConfigError(f"the draft needs at least one decoder layer, got {self.num_layers}")
        if not isinstance(self.fusion, str) or self.fusion not in ("dgf", "eagle", "none"):
            raise ConfigError(f"fusion must be 'dgf', 'eagle' or 'none', got {self.fusion!r}")
        if self.draft_vocab_size is not None:
            _check_int("DraftConfig", "draft_vocab_size", self.draft_vocab_size)
            if self.draft_vocab_size < 1:
                raise ConfigError(f"draft_vocab_size must be positive, got {self.draft_vocab_size}")
        if not isinstance(self.feature_layers, tuple):
            raise ConfigError(f"feature_layers must be a tuple of block indices, got {self.feature_layers!r}")
        for i in self.feature_layers:
            _check_int("DraftConfig", "feature_layers", i)
            if i < 0:
                raise ConfigError(f"feature_layers must be block indices >= 0, got {self.feature_layers}")
        # two or more: the draft tells the target's features (k * H wide) from its own outputs (H) by their width
        if len(set(self.feature_layers)) != len(self.feature_layers) or len(self.feature_layers) == 1:
            raise ConfigError(f"feature_layers must name 2 or more distinct blocks (or none), got "
                              f"{self.feature_layers}")
        if self.feature_layers and self.fusion == "none":
            raise ConfigError("a standalone LM draft (fusion 'none') reads no target features: no feature_layers")

    def check_target(self, cfg: ModelConfig) -> None:
        """Refuse feature layers the target does not have."""
        bad = [i for i in self.feature_layers if i >= cfg.num_layers]
        if bad:
            raise ConfigError(f"feature_layers {bad} out of range: {cfg.name} has blocks 0..{cfg.num_layers - 1}")

    def replace(self, **kw) -> DraftConfig:
        return dataclasses.replace(self, **kw)


def eagle3_feature_layers(num_layers: int) -> tuple[int, ...]:
    """EAGLE-3's low, middle and high target blocks for a `num_layers`-block target: (2, L // 2, L - 3), the
    outputs its reference code reads as HF `hidden_states[3]`, `[L // 2 + 1]` and `[L - 2]`."""
    if num_layers < 6:
        raise ConfigError(f"EAGLE-3's feature layers need a target of 6 or more blocks, got {num_layers}")
    return (2, num_layers // 2, num_layers - 3)


def resolve_feature_layers(spec: str | tuple[int, ...], num_layers: int) -> tuple[int, ...]:
    """A `--feature-layers` value for a target of `num_layers` blocks: "none" -> (), "eagle3" -> EAGLE-3's
    blocks, block indices as they are."""
    if spec == "none":
        return ()
    return eagle3_feature_layers(num_layers) if spec == "eagle3" else tuple(spec)


@dataclass(frozen=True)
class TreeConfig:
    """The EAGLE-2 dynamic tree: `depth` draft expansion passes keeping the `top_k` best frontier nodes, then
    the best `total_tokens - 1` candidates plus the root are verified. As in EAGLE-2 and Dovetail, the root's
    own top-k is one more level, so a tree has up to `depth + 1` levels below the root and a cycle commits at
    most `min(depth + 1, total_tokens - 1) + 1` tokens. `top_k == 1` is a chain.

    `lookup` L > 0 adds prompt-lookup decoding (`speculation.lookup`): in a cycle where the context's last tokens
    occurred earlier, the L tokens that followed are grafted onto the drafted tree below its deepest node that
    agrees with them, so the verified tree has `total_tokens + L` nodes and a path of up to `max_accepted + L`
    draft tokens. The draft's own tree and the simulator's acceptance models see only the first three fields."""

    # default: the fastest of the trees measured with the shipped SmolLM2 draft on this 2-core machine
    # (`dovetail bench dovetail`, analysis/results/bench_dovetail.json): 4/3/6
    top_k: int = 4
    depth: int = 3
    total_tokens: int = 6
    lookup: int = 0

    def __post_init__(self) -> None:
        for f in ("top_k", "depth", "total_tokens"):
            _check_int("TreeConfig", f, getattr(self, f))
            if getattr(self, f) < 1:
                raise ConfigError(f"tree {f} must be >= 1, got {getattr(self, f)}")
        _check_int("TreeConfig", "lookup", self.lookup)
        if self.lookup < 0:
            raise ConfigError(f"tree lookup must be >= 0 (0 = no prompt lookup), got {self.lookup}")
        if self.total_tokens - 1 > self.pool_size:
            raise ConfigError(
                f"total_tokens {self.total_tokens} exceeds 1 + the candidate pool of {self.pool_size} that top_k "
                f"{self.top_k} and depth {self.depth} can draft"
            )

    @property
    def pool_size(self) -> int:
        """Candidates drafted per cycle: the root's top-k, then top_k^2 per expansion."""
        return self.top_k + self.depth * self.top_k * self.top_k

    @property
    def max_accepted(self) -> int:
        """Most draft tokens one cycle can accept from the drafted tree alone (no lookup chain)."""
        return min(self.depth + 1, self.total_tokens - 1)

    @property
    def width(self) -> int:
        """Nodes on the longest root-to-node path of a verified tree (root and any lookup chain included)."""
        return self.max_accepted + 1 + self.lookup

    @property
    def drafted(self) -> TreeConfig:
        """The tree the draft itself makes (no lookup): what its compiled step depends on."""
        return dataclasses.replace(self, lookup=0)


# What `--mode dovetail` and `api.generate` use when no tree is given: the 4/3/6 tree and a lookup chain of 6
# (`python analysis/tune_lookup.py`, analysis/results/lookup_tuning.json; full sets in README "Prompt lookup").
DEFAULT_TREE = TreeConfig(lookup=6)

# The paper's trees (no lookup: add it with `--lookup L`).
TREE_PRESETS: dict[str, TreeConfig] = {
    "server": TreeConfig(top_k=10, depth=7, total_tokens=16),  # the paper's RTX 2080S / 3090 setting
    "laptop": TreeConfig(top_k=10, depth=4, total_tokens=7),  # the paper's GTX 1050 laptop setting
    "eagle2": TreeConfig(top_k=10, depth=5, total_tokens=60),  # EAGLE-2's GPU default
}
