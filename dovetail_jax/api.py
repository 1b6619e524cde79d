"""The notebook entry point: load a target and a draft, generate, read the statistics.

    from dovetail_jax import api
    target = api.load_target()   # the embedded SmolLM2-135M-Instruct, on the CPU
    draft = api.load_draft(target)              # the shipped draft (else a random one), on the accelerator
    out = api.generate(target, "What is JAX?", chat=True, max_new_tokens=64, draft=draft,
                       tree=api.TreeConfig(top_k=10, depth=4, total_tokens=7))
    print(out.text, out.stats.tokens_per_s, out.stats.acceptance.tau)

Without `draft`, `generate` decodes with the target alone (the baseline). `load_target` sets JAX up and
places the target (`devices.placement()`, or the `placement` it is given); drafts and generations follow it.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from dovetail_jax import devices, paths, progress
from dovetail_jax.config import DEFAULT_TREE, SEED_RANGE, DraftConfig, ModelConfig, SamplingConfig, TreeConfig
from dovetail_jax.decode import dovetail, target_only
from dovetail_jax.devices import Placement
from dovetail_jax.errors import ConfigError, ModelFormatError
from dovetail_jax.io import checkpoint
from dovetail_jax.io.load import load_model_files
from dovetail_jax.io.registry import default_draft_path, default_model_path
from dovetail_jax.io.tokenizer import StreamDecoder, Tokenizer
from dovetail_jax.model import draft as draft_lib
from dovetail_jax.model.draft import Draft
from dovetail_jax.model.params import Layout, TargetParams, params_from_tensors
from dovetail_jax.stats import GenerationStats

__all__ = ["DEFAULT_TREE", "HEAD_DTYPES", "Draft", "DraftConfig", "GenerationOutput", "Placement", "SamplingConfig",
           "Target", "TreeConfig", "check_draft_path", "encode_prompt", "generate", "load_draft", "load_target",
           "random_draft"]


@dataclass
class Target:
    """A loaded target model: config, float32 params committed to the target's device, tokenizer, and where it
    and its drafts run."""

    cfg: ModelConfig
    params: TargetParams
    tokenizer: Tokenizer
    source: str
    load_s: float
    placement: Placement
    path: Path | None = None  # the weights file or folder, when loaded from disk

    @functools.cached_property
    def sha256(self) -> str | None:
        """SHA-256 of the weights file (GGUF), computed once; drafts record it to name their target."""
        return checkpoint.file_sha256(self.path) if self.path is not None and self.path.is_file() else None

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return tuple(self.tokenizer.eos_token_ids) or self.cfg.eos_token_ids


# --- argument checks at the entry points: misuse is a ConfigError naming the argument, never a TypeError from deep
# inside JAX or the tokenizer --------------------------------------------------------------------------------------


def _check_instance(name: str, value: Any, cls: type, what: str) -> None:
    if not isinstance(value, cls):
        raise ConfigError(f"{name} must be {what}, got {type(value).__name__}")


def _check_path(name: str, path: Any) -> Path | None:
    """A path argument (None passes): a str or os.PathLike, and not a FIFO or device, whose reading would hang."""
    if path is None:
        return None
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"{name} must be a file or folder path, got {type(path).__name__}")
    p = Path(path).expanduser()
    try:
        mode = p.stat().st_mode
    except OSError:
        return p  # a missing path is reported by the loader, which knows what it expected
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise ConfigError(f"{name} {p} is not a regular file or folder (a pipe or device cannot be read as one)")
    return p


def _check_seed(seed: Any) -> None:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not SEED_RANGE[0] <= seed < SEED_RANGE[1]:
        raise ConfigError(f"seed must be an integer in [-2^63, 2^63), got {seed!r}")


def _check_text(name: str, text: str) -> None:
    """Lone surrogates (undecodable bytes kept by Python's surrogateescape) cannot be tokenized or printed."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ConfigError(f"{name} is not valid UTF-8 text (a lone surrogate at character {e.start})") from None


def _check_draft_config(cfg: Any, target: Target) -> None:
    _check_instance("cfg", cfg, DraftConfig, "a DraftConfig")
    for f in ("num_layers", "draft_vocab_size"):
        v = getattr(cfg, f)
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral)):
            raise ConfigError(f"DraftConfig.{f} must be an integer, got {v!r}")
    if cfg.num_layers > target.cfg.num_layers:
        raise ConfigError(f"a draft of {cfg.num_layers} decoder layers is deeper than the target itself "
                          f"({target.cfg.num_layers} layers): use 1..{target.cfg.num_layers}")
    cfg.check_target(target.cfg)


HEAD_DTYPES = ("float32", "bfloat16", "int8")  # a draft's shared LM head: as the target's, bf16, or int8 per row
# head_dtype None: int8 for drafts sharing the target's head (trained, random), float32 for standalone/self ones.
# bf16 was measured on the 244 evaluation prompts (same tau, less draft time: bench_dovetail_full_r3_head.json), int8
# against bf16 on HumanEval (same tau, less draft time: README, bench_dovetail_int8_ab.json).
SHARED_HEAD_DEFAULT = "int8"


# A draft's own matrices: as its checkpoint stores them (bf16 or f32), or int8 per output channel (`model.quant`).
# weight_dtype None: int8 for drafts sharing the target's head (trained, random; measured with the head, above),
# as stored for standalone and "self" drafts (whole LMs kept as they are, like their heads).
WEIGHT_DTYPES = ("stored", "int8")
SHARED_WEIGHTS_DEFAULT = "int8"


def _check_weight_dtype(weight_dtype: Any) -> None:
    if weight_dtype is not None and (not isinstance(weight_dtype, str) or weight_dtype not in WEIGHT_DTYPES):
        raise ConfigError(f"weight_dtype must be one of {', '.join(map(repr, WEIGHT_DTYPES))}, got {weight_dtype!r}")


def _with_weights(draft: Draft, weight_dtype: str | None, device: jax.Device) -> Draft:
    """`draft` with its matrices as `weight_dtype` says (None: the default for its kind, see WEIGHT_DTYPES)."""
    default = SHARED_WEIGHTS_DEFAULT if draft.kind in ("trained", "random") else "stored"
    if (weight_dtype or default) == "int8":
        return dataclasses.replace(draft, params=draft_lib.quantize_matrices(draft.params, device))
    return draft


def _check_head_dtype(head_dtype: Any) -> None:
    if head_dtype is None:
        return
    if not isinstance(head_dtype, str) or head_dtype not in HEAD_DTYPES:
        raise ConfigError(f"head_dtype must be one of {', '.join(map(repr, HEAD_DTYPES))}, got {head_dtype!r}")


def _refuse_own_head(head_dtype: str | None, what: str) -> None:
    """A standalone or self draft scores with its own model's whole head, not a shared copy: it stays float32."""
    if head_dtype not in (None, "float32"):
        raise ConfigError(f"head_dtype {head_dtype!r} applies to drafts that share the target's LM head (trained "
                          f"or random); {what} keeps its own float32 head")


def check_draft_path(path: str | Path) -> None:
    """Refuse, before any loading, a draft path that cannot be one: a pipe or device, or a folder that is neither
    a draft checkpoint (card.json + weights.safetensors) nor a model folder; the message names what is missing."""
    if path == "self":
        return
    p = _check_path("draft", path)
    if p is None or not p.is_dir() or (p / checkpoint.CARD).is_file() or (p / "config.json").is_file():
        return
    if len(list(p.glob("*.gguf"))) == 1:  # a folder holding one GGUF model (a standalone draft)
        return
    hint = (f" ({checkpoint.WEIGHTS} is there: was the folder copied without its card?)"
            if (p / checkpoint.WEIGHTS).is_file() else "")
    raise ModelFormatError(f"{p}: not a draft checkpoint folder, its {checkpoint.CARD} is missing{hint}; nor a "
                           "model folder (config.json + *.safetensors, or one .gguf file)")


def load_target(path: str | Path | None = None, layout: Layout = "out_in", tokenizer: str | Path | None = None,
                *, placement: Placement | None = None) -> Target:
    """Load a GGUF file or HF folder (None: the embedded default) onto the target (CPU) device.

    `layout` of the projection weights: "out_in" is fastest for single-token decoding, and for multi-token
    forwards such as tree verification where the compiled kernel runs; `params.fast_layout(T)` says which is
    faster for T tokens on this machine (without the kernel, "in_out" for T >= 2). `tokenizer` (a tokenizer.json or
    its folder) replaces the model's own, e.g. for a SentencePiece GGUF. `placement`: where the target and its
    drafts run; default `devices.placement()`, which sets JAX up first (two host devices, the compilation
    cache), so call this before other JAX work.
    """
    _check_path("path", path)
    if layout not in ("out_in", "in_out"):
        raise ConfigError(f"layout must be 'out_in' or 'in_out', got {layout!r}")
    _check_path("tokenizer", tokenizer)
    if placement is not None:
        _check_instance("placement", placement, Placement, "a Placement (devices.placement())")
    placement = placement or devices.placement()
    t0 = time.perf_counter()
    label = progress.short_path(path) if path is not None else "SmolLM2-135M-Instruct (the default)"
    progress.note(f"loading the target {label} onto {placement.target} ...")
    cfg, tensors, tokenizer = load_model_files(path, tokenizer=tokenizer)
    source = str(path) if path is not None else "default"
    params = params_from_tensors(cfg, tensors, placement.target, source=source, layout=layout)
    resolved = Path(path).expanduser() if path is not None else default_model_path()
    return Target(cfg, params, tokenizer, source, time.perf_counter() - t0, placement, path=resolved)


def random_draft(target: Target, cfg: DraftConfig = DraftConfig(), seed: int = 0, *,
                 head_dtype: str | None = None, weight_dtype: str | None = None) -> Draft:
    """An untrained draft (random weights) on the accelerator: lossless, just rarely right. A reduced
    vocabulary keeps the lowest ids, which in a BPE vocabulary are the earliest, most frequent merges.
    `head_dtype`, `weight_dtype`: as for `load_draft`."""
    _check_instance("target", target, Target, "a Target (api.load_target)")
    _check_draft_config(cfg, target)
    _check_seed(seed)
    _check_head_dtype(head_dtype)
    _check_weight_dtype(weight_dtype)
    dev = target.placement.draft
    params = draft_lib.init_draft(jax.random.key(seed), target.cfg, cfg, dev)
    vocab_map = None if cfg.draft_vocab_size is None else np.arange(min(cfg.draft_vocab_size, target.cfg.vocab_size))
    shared = draft_lib.make_shared(target.params, target.cfg, vocab_map, dev,
                                   head_dtype=head_dtype or SHARED_HEAD_DEFAULT)
    return _with_weights(Draft(cfg, params, shared, source=f"random (seed {seed})", kind="random"), weight_dtype, dev)


def load_draft(target: Target, path: str | Path | None = None, *, fallback_random: DraftConfig | None = None,
               seed: int = 0, head_dtype: str | None = None, weight_dtype: str | None = None,
               vocab_size: int | None = None) -> Draft:
    """Load a draft for `target` onto the accelerator.

    `path`: a draft checkpoint folder (`card.json` + `weights.safetensors`), or a whole LLaMA with the same
    vocabulary (GGUF or HF folder) used as a standalone draft, or "self" (the target itself as a standalone
    draft: accepts long paths, for tests and upper bounds; far too slow to speed anything up); None: the draft
    shipped for the target, if any, else a random draft shaped by `fallback_random` (an error when that is
    None too).

    `head_dtype` "bfloat16": the draft's copy of the target's LM head rows rounded to bfloat16 once (half the
    bytes the largest matrix of a draft forward streams); "int8": quantized per row (a quarter); either can
    change which tokens the draft proposes, never the output, which the target verifies. Only trained and
    random drafts share the target's head: a standalone or "self" draft with another dtype than "float32" is a
    ConfigError. None (default): int8 for trained and random drafts (on HumanEval it proposed what the bf16 head
    did, for less time, as bf16 did against float32 on the 244 evaluation prompts), float32 for standalone and
    "self" drafts; "float32" keeps the target's exact rows.

    `weight_dtype` "int8": the draft's own matrices (fusion, blocks) quantized per output channel
    (`model.quant`), half the bytes of a bf16 checkpoint's; like the head's dtype it can change what the draft
    proposes, never the output. "stored": as the checkpoint stores them. None: int8 for trained and random
    drafts (with the int8 head: the same tau on HumanEval, less draft time), as stored for standalone and "self"
    drafts.

    `vocab_size` widens a trained draft's reduced vocabulary to that many ids: its own, then those its
    checkpoint ranks next by training frequency (`vocab_order.npy`). The weights do not change; the head scores
    more rows (more bytes per draft step), so the draft can propose tokens it could not. None: as trained.
    """
    _check_instance("target", target, Target, "a Target (api.load_target)")
    if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral)
                                   or vocab_size < 1):
        raise ConfigError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    if fallback_random is not None:
        _check_draft_config(fallback_random, target)
    _check_seed(seed)
    _check_head_dtype(head_dtype)
    _check_weight_dtype(weight_dtype)
    if path is not None:
        check_draft_path(path)
    dev = target.placement.draft
    if vocab_size is not None and path == "self":
        raise ConfigError("vocab_size widens a trained draft's vocabulary; the 'self' draft scores every token")
    if path == "self":  # the target as its own standalone draft: agrees almost always, costs a target forward
        _refuse_own_head(head_dtype, "the 'self' draft")
        dcfg, params, shared = draft_lib.draft_from_lm(target.params, target.cfg, dev)
        return _with_weights(Draft(dcfg, params, shared, source="self (the target itself)", kind="self"),
                             weight_dtype, dev)
    if path is None:
        path = default_draft_path(target.sha256)
        if path is None:
            if fallback_random is None:
                raise ConfigError(f"no trained draft is shipped for {target.cfg.name}; pass a draft path")
            if vocab_size is not None:
                raise ConfigError(f"no trained draft is shipped for {target.cfg.name} to widen the vocabulary of; "
                                  "a random draft's vocabulary is its DraftConfig.draft_vocab_size")
            return random_draft(target, fallback_random, seed, head_dtype=head_dtype, weight_dtype=weight_dtype)
    p = Path(path).expanduser()
    progress.note(f"loading the draft {progress.short_path(p)} onto {dev} ...")
    if p.is_dir() and (p / checkpoint.CARD).is_file():
        dcfg, params, vocab_map, card = checkpoint.load_draft(p, target.cfg, dev, target.sha256,
                                                              vocab_size=vocab_size)
        shared = draft_lib.make_shared(target.params, target.cfg, vocab_map, dev,
                                       head_dtype=head_dtype or SHARED_HEAD_DEFAULT)
        return _with_weights(Draft(dcfg, params, shared, source=str(p), kind="trained"), weight_dtype, dev)
    _refuse_own_head(head_dtype, f"the standalone draft {p}")
    if vocab_size is not None:
        raise ConfigError(f"vocab_size widens a trained draft's vocabulary; the standalone draft {p} scores every "
                          "token")
    lm_cfg, tensors, _ = load_model_files(p)
    if lm_cfg.vocab_size != target.cfg.vocab_size:
        raise ModelFormatError(f"{p}: a standalone draft needs the target's vocabulary ({target.cfg.vocab_size} "
                               f"tokens), it has {lm_cfg.vocab_size}")
    if lm_cfg.hidden_size != target.cfg.hidden_size or lm_cfg.num_heads != target.cfg.num_heads:
        raise ModelFormatError(f"{p}: standalone drafts with other shapes than the target's are not supported yet "
                               f"(hidden {lm_cfg.hidden_size} vs {target.cfg.hidden_size})")
    lm = params_from_tensors(lm_cfg, tensors, None, source=str(p))
    dcfg, params, shared = draft_lib.draft_from_lm(lm, lm_cfg, dev)
    return _with_weights(Draft(dcfg, params, shared, source=str(p), kind="standalone"), weight_dtype, dev)


def encode_prompt(target: Target, prompt: str, chat: bool = False, system: str | None = None) -> list[int]:
    """Token ids of a raw prompt, or of a one-turn chat rendered with the model's chat template."""
    _check_instance("target", target, Target, "a Target (api.load_target)")
    _check_instance("prompt", prompt, str, "text")
    _check_text("prompt", prompt)
    if system is not None:
        _check_instance("system", system, str, "text")
        _check_text("system", system)
    return target.tokenizer.encode_prompt(prompt, chat, system)


@dataclass
class GenerationOutput:
    text: str
    token_ids: list[int]  # new tokens only
    prompt_ids: list[int]
    stats: GenerationStats
    placement: Placement | None = None  # where it ran (None: not recorded)

    def to_dict(self) -> dict[str, Any]:
        """The JSON record of `dovetail generate --json`."""
        d = {"text": self.text, "token_ids": self.token_ids, **self.stats.to_dict()}
        return d if self.placement is None else d | {"devices": self.placement.describe()}


def _prompt_ids(target: Target, prompt: Any, chat: bool, system: str | None) -> list[int]:
    """The prompt's token ids; a list of ids is checked against the vocabulary (a bad id would decode garbage)."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ConfigError("the prompt is empty")
        return encode_prompt(target, prompt, chat, system)
    if chat or system is not None:
        raise ConfigError("chat and system apply to a text prompt, not to token ids")
    if not isinstance(prompt, (list, tuple, np.ndarray)):
        raise ConfigError(f"prompt must be text or a list of token ids, got {type(prompt).__name__}")
    ids = list(np.asarray(prompt).ravel().tolist()) if isinstance(prompt, np.ndarray) else list(prompt)
    if not ids:
        raise ConfigError("the prompt has no tokens")
    vocab = target.cfg.vocab_size
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not 0 <= i < vocab:
            raise ConfigError(f"prompt token id {i!r} is not in the vocabulary (integers 0..{vocab - 1})")
    return [int(i) for i in ids]


def _check_generate(max_new_tokens: Any, sampling: Any, system: str | None, chat: bool, draft: Any,
                    tree: Any, on_text: Any) -> None:
    """Refuse what the CLI refuses, in the same words, before any work (ConfigError)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if sampling is not None and not isinstance(sampling, SamplingConfig):
        raise ConfigError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
    if system is not None and not chat:
        raise ConfigError("system only applies to chat=True prompts")
    if system is not None and not isinstance(system, str):
        raise ConfigError(f"system must be text, got {type(system).__name__}")
    if draft is not None and not isinstance(draft, Draft):
        raise ConfigError(f"draft must be a Draft (api.load_draft / api.random_draft), got {type(draft).__name__}")
    if tree is not None and draft is None:
        raise ConfigError("tree only applies to Dovetail decoding: pass a draft too")
    if tree is not None and not isinstance(tree, TreeConfig):
        raise ConfigError(f"tree must be a TreeConfig, got {type(tree).__name__}")
    if on_text is not None and not callable(on_text):
        raise ConfigError("on_text must be a function taking a text piece")


def generate(
    target: Target,
    prompt: str | list[int],
    *,
    chat: bool = False,
    system: str | None = None,
    max_new_tokens: int = 128,
    sampling: SamplingConfig | None = None,
    ignore_eos: bool = False,
    on_text: Callable[[str], None] | None = None,
    draft: Draft | None = None,
    tree: TreeConfig | None = None,
) -> GenerationOutput:
    """Dovetail generation with `draft` (tree shape `tree`, default `DEFAULT_TREE`: 4/3/6 and a prompt-lookup
    chain), else target-only. `on_text` receives decoded
    text pieces as tokens arrive (streaming). Greedy output is the target's own; sampling follows the target's
    distribution exactly. Bad arguments (as the CLI would refuse them) raise `ConfigError` before any work."""
    if not isinstance(target, Target):
        raise ConfigError(f"target must be a Target (api.load_target), got {type(target).__name__}")
    _check_generate(max_new_tokens, sampling, system, chat, draft, tree, on_text)
    max_new_tokens = int(max_new_tokens)  # numpy integers too, as plain Python ints from here on
    prompt_ids = _prompt_ids(target, prompt, chat, system)
    sampling = sampling or SamplingConfig()
    if sampling.top_k >= target.cfg.vocab_size:  # keeps every token, as top_k = 0 does (and fits an int32)
        sampling = dataclasses.replace(sampling, top_k=0)
    stream = StreamDecoder(target.tokenizer) if on_text is not None else None
    eos = target.eos_ids

    def on_token(t: int) -> None:
        if stream is not None and on_text is not None and (ignore_eos or t not in eos):
            piece = stream.push(t)
            if piece:
                on_text(piece)

    progress.note(f"compiling the decode programs (cached in {progress.short_path(paths.xla_cache())} for next "
                  f"time) ...")
    if draft is None:
        new_ids, stats = target_only.generate(target.params, target.cfg, prompt_ids, max_new_tokens, sampling, eos,
                                              on_token, ignore_eos, placement=target.placement)
    else:
        new_ids, stats = dovetail.generate(target.params, target.cfg, draft, prompt_ids, max_new_tokens,
                                           tree or DEFAULT_TREE, sampling, eos, on_token, ignore_eos,
                                           placement=target.placement)
    if stream is not None and on_text is not None:
        rest = stream.flush()
        if rest:
            on_text(rest)
    text_ids = new_ids if ignore_eos or not new_ids or new_ids[-1] not in eos else new_ids[:-1]
    return GenerationOutput(target.tokenizer.decode(text_ids), new_ids, prompt_ids, stats, target.placement)
