"""What is being run: target model, draft and tree (the library's `dovetail_jax.config` classes, with their rules),
dtypes, and memory footprints.

Kept apart from costs so that memory checks ("does it fit the VRAM budget?") and cost predictors share one
source of bytes and parameter counts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from dovetail_jax.config import KNOWN_MODELS, TREE_PRESETS, DraftConfig, ModelConfig, TreeConfig
from simulator.engines import CpuEngine, GpuFramework, resolve_engine, resolve_gpu_framework
from simulator.errors import ConfigError

# bytes per weight; GGUF block formats carry their scales: Q8_0 = 34 B / 32 weights, Q4_0 = 18 B / 32, Q4_K = 144 B /
# 256; Q4_K_M mixes Q4_K and Q6_K tensors: llama.cpp lists LLaMA 7B Q4_K_M as 3.80 GiB for 6.74 B weights
DTYPE_BYTES: dict[str, float] = {"f32": 4.0, "bf16": 2.0, "f16": 2.0, "int8": 1.0, "q4": 0.5625, "q8_0": 34 / 32,
                                 "q5_0": 22 / 32, "q4_0": 18 / 32, "q4_k": 144 / 256, "q4_k_m": 3.80 * 2 ** 30 / 6.74e9}
ID_BYTES = 4  # token ids / parents cross the boundary as int32
MAX_GUESSES = 16  # speculative next trees the pipelined schedule may draft per cycle (acceptance ranks as many)
# the simulator's default tree is the paper's server setting (10/7/16), not the library's 4/3/6, which is tuned
# for this 2-core host: the simulator mostly answers questions about the paper's machines
PAPER_TREE: TreeConfig = TREE_PRESETS["server"]


def dtype_bytes(name: str) -> float:
    if name not in DTYPE_BYTES:
        raise ConfigError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[name]


def resolve_model(name: str) -> ModelConfig:
    """A public config by name (see `dovetail_jax.config.KNOWN_MODELS`)."""
    key = name.lower()
    if key not in KNOWN_MODELS:
        raise ConfigError(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)}")
    return KNOWN_MODELS[key]


@dataclass(frozen=True)
class Workload:
    model: ModelConfig
    draft: DraftConfig = DraftConfig()  # the draft's layers take the target's shapes
    tree: TreeConfig = PAPER_TREE
    target_dtype: str = "f32"  # on the CPU
    draft_dtype: str = "f16"  # on the GPU (also the dtype of target layers placed on the GPU)
    prompt_len: int = 128
    new_tokens: int = 256
    kv_slots: int | None = None  # attention span of an implementation that attends over a preallocated cache
    cpu_engine: str | None = None  # what runs the target on the CPU (simulator.engines); None = the profile's own
    gpu_framework: str | None = None  # what runs on the GPU (torch-eager, cuda-graph); None = gpu.layer_s only
    # the plain (target-only) decode loop on the GPU: None = EAGLE's model with HF generate's step; else a named loop
    # of the framework (simulator.engines.DECODE_LOOPS: hf-generate, sequoia)
    decode_loop: str | None = None

    def __post_init__(self) -> None:
        dtype_bytes(self.target_dtype)
        dtype_bytes(self.draft_dtype)
        eng = self.engine
        if eng is not None:
            eng.path(self.target_dtype)  # refuses a dtype the engine has no real path for
        fw = resolve_gpu_framework(self.gpu_framework)  # refuses an unknown name
        if self.decode_loop is not None:
            if fw is None:
                raise ConfigError(f"decode loop {self.decode_loop!r} needs a gpu framework")
            fw.loop(self.decode_loop)  # refuses an unknown loop
        if self.prompt_len < 1 or self.new_tokens < 1:
            raise ConfigError(f"prompt_len and new_tokens must be >= 1, got {self.prompt_len}, "
                              f"{self.new_tokens}")
        if self.kv_slots is not None and self.kv_slots < 1:
            raise ConfigError(f"kv_slots must be >= 1, got {self.kv_slots}")
        if self.max_ctx > self.model.max_position_embeddings:
            raise ConfigError(f"prompt_len + new_tokens + tree ({self.max_ctx}) exceeds the model's "
                              f"{self.model.max_position_embeddings} positions")

    def replace(self, **kw: object) -> Workload:
        return replace(self, **kw)  # type: ignore[arg-type]

    @property
    def engine(self) -> CpuEngine | None:
        return resolve_engine(self.cpu_engine)

    @property
    def framework(self) -> GpuFramework | None:
        return resolve_gpu_framework(self.gpu_framework)

    def target_bytes_per_weight(self) -> float:
        """Bytes per target weight as the engine stores it (its dtype path), else the dtype's nominal size."""
        eng = self.engine
        return eng.path(self.target_dtype).bytes_per_weight if eng else dtype_bytes(self.target_dtype)

    @property
    def max_ctx(self) -> int:
        return self.prompt_len + self.new_tokens + self.tree.total_tokens + self.tree.lookup

    @property
    def draft_vocab(self) -> int:
        return self.draft.draft_vocab_size or self.model.vocab_size

    # ---- parameter counts -------------------------------------------------------------------------------
    @property
    def fusion_params(self) -> int:
        """The fusion's weights, plus a multi-layer-feature draft's projection of its k target features (k H x H
        and a norm). That projection runs only on the accepted rows' pass; pricing it on every pass overcounts
        k H^2 weights per expansion (for SmolLM2 with 3 features: 1.0M of a 1-layer draft pass's ~12M)."""
        h, k = self.model.hidden_size, len(self.draft.feature_layers)
        fc = k * h * h + h if k else 0
        return {"dgf": 4 * h * h, "eagle": 2 * h * h + h, "none": 0}[self.draft.fusion] + fc

    @property
    def draft_layers(self) -> int:
        return self.draft.num_layers

    def draft_params(self) -> int:
        """Fusion + layers + embedding copy + head copy (one copy when the target ties them and V' = V)."""
        m = self.model
        emb = m.vocab_size * m.hidden_size
        head = self.draft_vocab * m.hidden_size
        shared = m.tie_word_embeddings and self.draft_vocab == m.vocab_size
        return self.fusion_params + self.draft_layers * m.layer_params + emb + (0 if shared else head) + m.hidden_size

    # ---- bytes ---------------------------------------------------------------------------------------------
    def target_weight_bytes(self, layers: int | None = None, with_embed_head: bool = True) -> float:
        """Target weights in the target dtype: `layers` decoder layers (default all), plus embedding, head and
        final norm."""
        m = self.model
        nl = m.num_layers if layers is None else layers
        b = nl * m.layer_params
        if with_embed_head:
            b += m.num_params - m.num_layers * m.layer_params
        return b * self.target_bytes_per_weight()

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
        return self.target_weight_bytes(nl, with_head) + 2 * nl * m.kv_size * 4 * self.max_ctx
