"""The notebook entry point: load a target (and later a draft), generate, read the statistics.

    from dovetail_jax import api
    target = api.load_target()                  # the embedded SmolLM2-135M-Instruct
    out = api.generate(target, "What is JAX?", chat=True, max_new_tokens=64)
    print(out.text, out.stats.tokens_per_s)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dovetail_jax import devices
from dovetail_jax.config import ModelConfig, SamplingConfig
from dovetail_jax.decode import target_only
from dovetail_jax.decode.stats import GenerationStats
from dovetail_jax.errors import ConfigError
from dovetail_jax.io.load import load_model_files
from dovetail_jax.io.tokenizer import StreamDecoder, Tokenizer
from dovetail_jax.model.params import Layout, TargetParams, params_from_tensors


@dataclass
class Target:
    """A loaded target model: config, float32 params committed to the CPU device, tokenizer."""

    cfg: ModelConfig
    params: TargetParams
    tokenizer: Tokenizer
    source: str
    load_s: float

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return tuple(self.tokenizer.eos_token_ids) or self.cfg.eos_token_ids


def load_target(path: str | Path | None = None, layout: Layout = "out_in",
                tokenizer: str | Path | None = None) -> Target:
    """Load a GGUF file or HF folder (None: the embedded default) onto the target (CPU) device.

    `layout` of the projection weights: "out_in" is fastest for single-token decoding, "in_out" for
    multi-token forwards such as tree verification (see `model/params.py`). `tokenizer` (a tokenizer.json or
    its folder) replaces the model's own, e.g. for a SentencePiece GGUF.
    """
    t0 = time.perf_counter()
    cfg, tensors, tokenizer = load_model_files(path, tokenizer=tokenizer)
    source = str(path) if path is not None else "default"
    params = params_from_tensors(cfg, tensors, devices.target_device(), source=source, layout=layout)
    return Target(cfg, params, tokenizer, source, time.perf_counter() - t0)


def encode_prompt(target: Target, prompt: str, chat: bool = False, system: str | None = None) -> list[int]:
    """Token ids of a raw prompt, or of a one-turn chat rendered with the model's chat template."""
    if not prompt:
        raise ConfigError("the prompt is empty")
    if chat:
        messages: list[dict[str, str]] = []
        if system is not None:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": prompt})
        prompt = target.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    # a rendered template already holds any BOS it wants; raw prompts get the tokenizer's own specials
    ids = target.tokenizer.encode(prompt, add_special_tokens=not chat)
    if not ids:
        raise ConfigError("the prompt encodes to no tokens")
    return ids


@dataclass
class GenerationOutput:
    text: str
    token_ids: list[int]  # new tokens only
    prompt_ids: list[int]
    stats: GenerationStats

    def to_dict(self) -> dict[str, Any]:
        d = {"text": self.text, "token_ids": self.token_ids, **self.stats.to_dict(), "devices": devices.describe()}
        return d


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
) -> GenerationOutput:
    """Target-only generation. `on_text` receives decoded text pieces as tokens arrive (streaming)."""
    prompt_ids = list(prompt) if isinstance(prompt, list) else encode_prompt(target, prompt, chat, system)
    sampling = sampling or SamplingConfig()
    stream = StreamDecoder(target.tokenizer) if on_text is not None else None
    eos = target.eos_ids

    def on_token(t: int) -> None:
        if stream is not None and on_text is not None and (ignore_eos or t not in eos):
            piece = stream.push(t)
            if piece:
                on_text(piece)

    new_ids, stats = target_only.generate(
        target.params, target.cfg, prompt_ids, max_new_tokens, sampling, eos, on_token, ignore_eos
    )
    if stream is not None and on_text is not None:
        rest = stream.flush()
        if rest:
            on_text(rest)
    text_ids = new_ids if ignore_eos or not new_ids or new_ids[-1] not in eos else new_ids[:-1]
    return GenerationOutput(target.tokenizer.decode(text_ids), new_ids, prompt_ids, stats)
