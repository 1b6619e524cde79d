"""Self-distillation data: the target's own greedy answers to the training prompts, in a resumable JSONL file.

Each line is one conversation: `{"index", "source", "prompt", "prompt_ids", "answer_ids", "target_sha256"}`.
Lines are appended and flushed batch by batch, so an interrupted run loses at most the batch in flight;
a rerun skips the indices already present. A file written for another target is refused.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dovetail_jax.decode.batched import generate_greedy_batch
from dovetail_jax.errors import ConfigError, ModelFormatError
from dovetail_jax.train.prompts import Prompt


def read_answers(path: Path, target_sha256: str | None = None) -> list[dict[str, Any]]:
    """All complete records of an answers file (a torn last line from a crash is ignored)."""
    if not path.exists():
        return []
    records = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):
                break  # the line being written when the run stopped
            raise ModelFormatError(f"{path}:{n}: not a JSON line; the answers file is damaged") from None
        if target_sha256 is not None and rec.get("target_sha256") != target_sha256:
            raise ModelFormatError(f"{path}:{n}: answers of another target (weights sha256 "
                                   f"{str(rec.get('target_sha256'))[:12]}…, this target {target_sha256[:12]}…); "
                                   "use another --work folder")
        records.append(rec)
    return records


def _repair_tail(path: Path) -> None:
    """Drop a torn last line so appends start on a fresh line."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def generate_answers(target: Any, prompts: Sequence[Prompt], path: Path, max_new_tokens: int = 256,
                     batch_size: int = 48, progress: bool = True) -> dict[str, Any]:
    """Answer every prompt not yet in `path` with the target's greedy decoding; returns a summary."""
    if batch_size <= 0:
        raise ConfigError(f"batch size must be positive, got {batch_size}")
    sha = target.sha256
    done = {r["index"] for r in read_answers(path, sha)}
    _repair_tail(path)
    todo = [(i, p) for i, p in enumerate(prompts) if i not in done]
    encoded = [(i, p, target.tokenizer.encode_prompt(p.text, chat=True)) for i, p in todo]
    # Batches of similar prompt length waste less padding; order inside a window of 8 batches only.
    window = batch_size * 8
    batches = []
    for w in range(0, len(encoded), window):
        chunk = sorted(encoded[w:w + window], key=lambda x: len(x[2]))
        batches += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
    path.parent.mkdir(parents=True, exist_ok=True)
    new_tokens, t0 = 0, time.perf_counter()
    bar = tqdm(total=len(prompts), initial=len(done), unit="prompt", desc="answers", disable=not progress)
    with path.open("a", encoding="utf-8") as f:
        for batch in batches:
            answers = generate_greedy_batch(target.params, target.cfg, [x[2] for x in batch], max_new_tokens,
                                            target.eos_ids)
            for (i, p, ids), ans in zip(batch, answers, strict=True):
                f.write(json.dumps({"index": i, "source": p.source, "prompt": p.text, "prompt_ids": ids,
                                    "answer_ids": ans, "target_sha256": sha}) + "\n")
                new_tokens += len(ans)
            f.flush()
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{new_tokens / (time.perf_counter() - t0):.0f}")
    bar.close()
    return {"prompts": len(prompts), "already_done": len(done), "answered": len(todo), "new_tokens": new_tokens,
            "seconds": time.perf_counter() - t0}
