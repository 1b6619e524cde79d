"""What is being run: target model shapes (from `dovetail_jax.config`), draft, tree, dtypes, and memory footprints.

Kept apart from costs so that memory checks ("does it fit the VRAM budget?") and cost predictors share one
source of bytes and parameter counts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from dovetail_jax.config import KNOWN_MODELS, ModelConfig
from simulator.errors import SimulatorInputError

SCHEDULES = ("target-cpu", "gpu-only", "offload", "partial", "dovetail", "dovetail-pipelined", "eagle2")
SPECULATIVE = ("dovetail", "dovetail-pipelined", "eagle2")
DTYPE_BYTES: dict[str, float] = {"f32": 4.0, "bf16": 2.0, "f16": 2.0, "int8": 1.0, "q4": 0.5625}
ID_BYTES = 4  # token ids / parents cross the boundary as int32


def dtype_bytes(name: str) -> float:
    if name not in DTYPE_BYTES:
        raise SimulatorInputError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[name]


def resolve_model(name: str) -> ModelConfig:
    """A public config by name (see `dovetail_jax.config.KNOWN_MODELS`)."""
    key = name.lower()
    if key not in KNOWN_MODELS:
        raise SimulatorInputError(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)}")
    return KNOWN_MODELS[key]


@dataclass(frozen=True)
class DraftShape:
    """Dovetail draft (DGF fusion + n_layers decoder layers) or EAGLE head (fc 2H->H + 1 layer), target width."""

    n_layers: int = 1
    vocab: int | None = None  # reduced draft-head vocabulary V'; None = target vocabulary
    kind: str = "dgf"  # "dgf" | "eagle" | "none" (a standalone LLaMA draft: no fusion)

    def __post_init__(self) -> None:
        if self.n_layers < 1:
            raise SimulatorInputError(f"draft layers must be >= 1, got {self.n_layers}")
        if self.vocab is not None and self.vocab < 1:
            raise SimulatorInputError(f"draft vocabulary must be >= 1, got {self.vocab}")
        if self.kind not in ("dgf", "eagle", "none"):
            raise SimulatorInputError(f"draft kind must be 'dgf', 'eagle' or 'none', got {self.kind!r}")


@dataclass(frozen=True)
class TreeShape:
    """EAGLE-2 dynamic tree: top_k branching, depth expansion steps, total_tokens verified (root included)."""

    top_k: int = 10
    depth: int = 7
    total_tokens: int = 16

    def __post_init__(self) -> None:
        if self.top_k < 1 or self.depth < 1 or self.total_tokens < 2:
            raise SimulatorInputError(f"tree needs top_k >= 1, depth >= 1, total_tokens >= 2; got top_k={self.top_k}, "
                                      f"depth={self.depth}, total_tokens={self.total_tokens}")
        if self.total_tokens - 1 > self.top_k + self.depth * self.top_k ** 2:
            raise SimulatorInputError(f"total_tokens={self.total_tokens} exceeds the candidate pool "
                                      f"{1 + self.top_k + self.depth * self.top_k ** 2} of top_k={self.top_k}, "
                                      f"depth={self.depth}")

    @property
    def nodes(self) -> int:
        return self.total_tokens - 1

    @property
    def max_accept(self) -> int:
        """Deepest acceptable path: depth+1 levels below the root, and no more than the draft nodes."""
        return min(self.depth + 1, self.nodes)


EAGLE2_TREE = TreeShape(top_k=10, depth=5, total_tokens=60)


@dataclass(frozen=True)
class Workload:
    model: ModelConfig
    draft: DraftShape = DraftShape()
    tree: TreeShape = TreeShape()
    target_dtype: str = "f32"  # on the CPU
    draft_dtype: str = "f16"  # on the GPU (also the dtype of target layers placed on the GPU)
    prompt_len: int = 128
    new_tokens: int = 256
    kv_slots: int | None = None  # attention span of an implementation that attends over a preallocated cache

    def __post_init__(self) -> None:
        dtype_bytes(self.target_dtype)
        dtype_bytes(self.draft_dtype)
        if self.prompt_len < 1 or self.new_tokens < 1:
            raise SimulatorInputError(f"prompt_len and new_tokens must be >= 1, got {self.prompt_len}, "
                                      f"{self.new_tokens}")
        if self.kv_slots is not None and self.kv_slots < 1:
            raise SimulatorInputError(f"kv_slots must be >= 1, got {self.kv_slots}")
        if self.max_ctx > self.model.max_position_embeddings:
            raise SimulatorInputError(f"prompt_len + new_tokens + tree ({self.max_ctx}) exceeds the model's "
                                      f"{self.model.max_position_embeddings} positions")

    def replace(self, **kw: object) -> Workload:
        return replace(self, **kw)  # type: ignore[arg-type]

    @property
    def max_ctx(self) -> int:
        return self.prompt_len + self.new_tokens + self.tree.total_tokens

    @property
    def draft_vocab(self) -> int:
        return self.draft.vocab or self.model.vocab_size

    # ---- parameter counts -------------------------------------------------------------------------------
    @property
    def fusion_params(self) -> int:
        h = self.model.hidden_size
        return {"dgf": 4 * h * h, "eagle": 2 * h * h + h, "none": 0}[self.draft.kind]

    @property
    def draft_layers(self) -> int:
        return self.draft.n_layers

    def draft_params(self) -> int:
        """Fusion + layers + embedding copy + head copy (one copy when the target ties them and V' = V)."""
        m = self.model
        emb = m.vocab_size * m.hidden_size
        head = self.draft_vocab * m.hidden_size
        shared = m.tie_word_embeddings and self.draft_vocab == m.vocab_size
        return self.fusion_params + self.draft_layers * m.layer_params + emb + (0 if shared else head) + m.hidden_size

    # ---- bytes ---------------------------------------------------------------------------------------------
    def target_weight_bytes(self, layers: int | None = None, with_embed_head: bool = True) -> float:
        m = self.model
        nl = m.num_layers if layers is None else layers
        b = nl * m.layer_params
        if with_embed_head:
            b += m.num_params - m.num_layers * m.layer_params
        return b * dtype_bytes(self.target_dtype)

    def draft_vram_bytes(self) -> float:
        """Draft weights + its KV for the longest context + tree-expansion workspace (logits of k rows)."""
        db = dtype_bytes(self.draft_dtype)
        kv = 2 * self.draft_layers * self.model.kv_size * db * (self.max_ctx + self.tree.depth * self.tree.top_k)
        work = self.tree.top_k * self.draft_vocab * 4 * 2 + self.tree.top_k * self.model.hidden_size * 4 * 8
        return self.draft_params() * db + kv + work

    def gpu_target_bytes(self, ngl: int) -> float:
        """Target layers 0..ngl-1 and the embedding on the GPU (draft dtype) with their KV."""
        if ngl <= 0:
            return 0.0
        m = self.model
        db = dtype_bytes(self.draft_dtype)
        return (ngl * m.layer_params + m.vocab_size * m.hidden_size) * db + 2 * ngl * m.kv_size * db * self.max_ctx

    def host_bytes(self, cpu_layers: int | None = None, with_head: bool = True) -> float:
        """Target weights kept on the CPU + their fp32-or-target-dtype KV cache."""
        m = self.model
        nl = m.num_layers if cpu_layers is None else cpu_layers
        tb = dtype_bytes(self.target_dtype)
        w = nl * m.layer_params * tb
        if with_head:
            w += (m.num_params - m.num_layers * m.layer_params) * tb
        return w + 2 * nl * m.kv_size * 4 * self.max_ctx
