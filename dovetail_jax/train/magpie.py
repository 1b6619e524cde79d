"""Self-prompting ("Magpie"): the target writes user turns itself, sampled from its chat template's user prefix.

An instruct model given only the text that precedes a user message (`<|im_start|>system ...<|im_end|>\n
<|im_start|>user\n` for SmolLM2) continues with a plausible user request and closes it with its end-of-turn
token. Sampling many such continuations yields prompts from the target's own chat distribution, which the
target then answers greedily (`train/distill.py`). Generation runs in `distill.run_batch` (continuously
refilled batch, no features) and appends to a JSONL file as turns finish; each turn's sample depends only on
(seed, its index, position), so a resumed or re-batched run writes the same turns.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dovetail_jax.errors import ConfigError, ModelFormatError
from dovetail_jax.train.distill import run_batch
from dovetail_jax.train.sources import _looks_english

_MARK = "\x00MAGPIE\x00"


def user_prefix_ids(tokenizer: Any) -> list[int]:
    """Token ids of the chat template up to where a user message's text begins (system turn included)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": _MARK}], add_generation_prompt=False)
    if _MARK not in text:
        raise ConfigError("the chat template does not place the user message verbatim")
    ids = tokenizer.encode(text[:text.index(_MARK)], add_special_tokens=False)
    if not ids:
        raise ConfigError("the chat template has no user prefix")
    return ids


def _read(path: Path, sha: str | None, settings: dict[str, Any]) -> set[int]:
    done: set[int] = set()
    if not path.exists():
        return done
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):  # a torn last line from a crash
        path.write_bytes(data[: data.rfind(b"\n") + 1])
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        rec = json.loads(line)
        if rec.get("target_sha256") != sha or rec.get("settings") != settings:
            raise ModelFormatError(f"{path}:{n}: user turns of another target or other sampling settings "
                                   f"({rec.get('settings')}, not {settings}); use another file")
        done.add(int(rec["index"]))
    return done


def generate_user_turns(target: Any, n: int, path: Path, *, seed: int = 0, temperature: float = 1.0,
                        top_p: float = 1.0, max_tokens: int = 128, batch_size: int = 48, refill_rows: int = 8,
                        progress: bool = True) -> dict[str, Any]:
    """Sample user turns 0..n-1 (those not yet in `path`) and append them as JSON lines
    `{"index", "text", "keep", "reason", "settings", "target_sha256"}`; returns a summary.

    `keep` is false for a turn that did not end with the end-of-turn token within `max_tokens`, is shorter than
    10 characters, holds special tokens or does not look English. Duplicates are dropped by
    `sources.read_magpie`, which also reads only kept turns."""
    if temperature <= 0:
        raise ConfigError("self-prompting samples: temperature must be positive")
    settings = {"seed": seed, "temperature": temperature, "top_p": top_p, "max_tokens": max_tokens}
    sha = target.sha256
    done = _read(path, sha, settings)
    prefix = user_prefix_ids(target.tokenizer)
    todo = [(i, prefix) for i in range(n) if i not in done]
    eos = set(target.eos_ids)
    path.parent.mkdir(parents=True, exist_ok=True)
    kept, t0, tokens = 0, time.perf_counter(), 0
    bar = tqdm(total=n, initial=n - len(todo), unit="turn", desc="self-prompting", disable=not progress)
    with path.open("a", encoding="utf-8") as f:
        for k, conv in enumerate(run_batch(target.params, target.cfg, todo, max_new_tokens=max_tokens, eos_ids=eos,
                                           batch_size=batch_size, refill_rows=refill_rows,
                                           max_prompt_tokens=len(prefix), with_features=False,
                                           sample=(seed, temperature, top_p))):
            ids = conv.answer_ids
            tokens += len(ids)
            ended = bool(ids) and ids[-1] in eos
            body = ids[:-1] if ended else ids
            text = target.tokenizer.decode(body, skip_special_tokens=False).strip()
            clean = target.tokenizer.decode(body, skip_special_tokens=True).strip()
            reason = ("no end of turn" if not ended else "special tokens" if clean != text
                      else "too short" if len(text) < 10 else "not English" if not _looks_english(text) else "")
            kept += not reason
            f.write(json.dumps({"index": conv.key, "text": text, "keep": not reason, "reason": reason,
                                "settings": settings, "target_sha256": sha}) + "\n")
            if k % 16 == 15:
                f.flush()
            bar.update(1)
            bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - t0):.0f}")
    bar.close()
    return {"asked": n, "already_done": len(done), "generated": len(todo), "kept": kept, "tokens": tokens,
            "seconds": time.perf_counter() - t0}
