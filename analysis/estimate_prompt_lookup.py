"""How many tokens would a prompt-lookup branch accept per cycle, on the target's own greedy outputs?

A diagnostic for the next lever of issue 12, not a decoder: the 4/3/6 tree accepts at most 4 tokens a cycle
(3 drafted + 1 bonus), while code answers often restate the prompt's code, which an n-gram lookup in the context
(prompt-lookup decoding) proposes for free and at any length. This script decodes the evaluation prompts with the
target alone (greedy, the bench's settings, outputs cached under ~/.cache so a rerun only analyses), then replays
each output as a lookup-only speculative decoder: at each cycle the longest suffix of the context (n = 3, 2, 1
tokens) that occurred earlier proposes the L tokens that followed its latest occurrence; the target accepts the
matching prefix plus one token. It reports τ (tokens per cycle) per chain length L and how many tokens come in
cycles that accept more than the default tree's maximum of 4, and (for L = 8) how many tokens a chain gives by
the length of the suffix that matched.

    python analysis/estimate_prompt_lookup.py --out analysis/results/prompt_lookup_estimate.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from dovetail_jax import api
from dovetail_jax.io import checkpoint, registry
from dovetail_jax.io.eval_prompts import load_dataset

CACHE = Path.home() / ".cache" / "dovetail_jax" / "prompt_lookup"
CHAINS = (1, 2, 3, 4, 6, 8, 12, 16)
TREE_MAX = 4  # tokens a 4/3/6 tree can give in a cycle: depth 3 + the bonus token
MATCH_CHAIN = 8  # the chain length of the per-match-length breakdown


def lookup(context: list[int], max_n: int, length: int) -> tuple[int, list[int]]:
    """The matched suffix length n (0: none) and the `length` tokens after the latest earlier occurrence of the
    longest suffix (n ≤ max_n) of `context`."""
    for n in range(min(max_n, len(context) - 1), 0, -1):
        suffix = context[-n:]
        for start in range(len(context) - n - 1, -1, -1):
            if context[start:start + n] == suffix:
                return n, context[start + n:start + n + length]
    return 0, []


def replay(prompt: list[int], output: list[int], max_n: int, length: int) -> list[tuple[int, int]]:
    """(tokens accepted, matched suffix length) per cycle of a lookup-only decoder that produces exactly `output`
    after `prompt`."""
    context, pos, per_cycle = list(prompt), 0, []
    while pos < len(output):
        n, guess = lookup(context, max_n, length)
        accepted = 0
        while accepted < len(guess) and pos + accepted < len(output) and guess[accepted] == output[pos + accepted]:
            accepted += 1
        step = min(accepted + 1, len(output) - pos)  # the matched prefix, then the target's own next token
        context.extend(output[pos:pos + step])
        pos += step
        per_cycle.append((step, n))
    return per_cycle


def cache_path(target_path: Path, dataset: str, max_new_tokens: int) -> Path:
    """Where a target's outputs for a dataset are cached: keyed by the weights' SHA-256, so another target (or a
    re-quantized file) never reads this one's outputs."""
    sha = checkpoint.file_sha256(target_path) if target_path.is_file() else target_path.resolve().name
    return CACHE / f"{sha[:12]}_{dataset}_{max_new_tokens}.jsonl"


def target_outputs(target_path: Path, dataset: str, limit: int, max_new_tokens: int) -> list[dict]:
    """Greedy target-only outputs (prompt ids and new ids) for the first `limit` prompts, cached on disk."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = cache_path(target_path, dataset, max_new_tokens)
    done = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    prompts = load_dataset(dataset)[:limit]
    if len(done) >= len(prompts):
        return done[:len(prompts)]
    target = api.load_target(target_path)
    with path.open("a") as f:
        for pid, message in prompts[len(done):]:
            t0 = time.perf_counter()
            out = api.generate(target, message, chat=True, max_new_tokens=max_new_tokens)
            rec = {"id": pid, "prompt_ids": [int(t) for t in out.prompt_ids],
                   "new_ids": [int(t) for t in out.token_ids]}
            f.write(json.dumps(rec) + "\n")
            f.flush()
            done.append(rec)
            print(f"{dataset} {pid}: {len(out.token_ids)} tokens in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return done


def by_match_length(records: list[dict], max_n: int, length: int) -> dict:
    """Per matched suffix length n (0 = no match): how many chain tokens the target accepts. What decides the
    shortest match worth verifying a chain for (`speculation.lookup.MIN_NGRAM`)."""
    cycles = np.asarray([c for r in records for c in replay(r["prompt_ids"], r["new_ids"], max_n, length)])
    drafted = cycles[:, 0] - 1  # the chain tokens accepted (the last token of a cycle is the target's own)
    out = {}
    for n in range(max_n + 1):
        a = drafted[cycles[:, 1] == n]
        out[str(n)] = {"cycles": int(a.size), "share_of_cycles": float(a.size / len(cycles)),
                       "mean_accepted": float(a.mean()) if a.size else None,
                       "share_accepting_1_or_more": float((a >= 1).mean()) if a.size else None,
                       "share_accepting_4_or_more": float((a >= 4).mean()) if a.size else None}
    return out


def summarize(records: list[dict], max_n: int) -> dict:
    rows = {}
    for length in CHAINS:
        cycles = [step for r in records for step, _ in replay(r["prompt_ids"], r["new_ids"], max_n, length)]
        arr = np.asarray(cycles)
        rows[str(length)] = {
            "tau": float(arr.mean()),
            "cycles": int(arr.size),
            "tokens": int(arr.sum()),
            "share_of_tokens_in_cycles_over_tree_max": float(arr[arr > TREE_MAX].sum() / arr.sum()),
            "share_of_cycles_over_tree_max": float((arr > TREE_MAX).mean()),
        }
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", type=Path, default=None,
                    help="GGUF file or HF folder of the target (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--datasets", nargs="+", default=["humaneval", "mtbench"])
    ap.add_argument("--limit", type=int, default=1000, help="first N prompts of each dataset")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="as the bench (default 128)")
    ap.add_argument("--max-n", type=int, default=3, help="longest suffix n-gram matched (default 3)")
    ap.add_argument("--out", type=Path, help="JSON to write (else stdout)")
    args = ap.parse_args()
    target_path = args.target or registry.default_model_path()
    if not target_path.exists():
        sys.exit(f"error: --target {target_path}: no such file or folder")
    result = {"schema": "dovetail.analysis.prompt_lookup/1",
              "command": "python analysis/estimate_prompt_lookup.py " + " ".join(sys.argv[1:]),
              "settings": {"max_new_tokens": args.max_new_tokens, "max_n": args.max_n, "chat": True,
                           "greedy": True, "tree_max_tokens_per_cycle": TREE_MAX, "target": target_path.name},
              "datasets": {}}
    for ds in args.datasets:
        records = target_outputs(target_path, ds, args.limit, args.max_new_tokens)
        result["datasets"][ds] = {"prompts": len(records),
                                  "tokens": sum(len(r["new_ids"]) for r in records),
                                  "by_chain_length": summarize(records, args.max_n),
                                  f"by_match_length_chain_{MATCH_CHAIN}": by_match_length(records, args.max_n,
                                                                                          MATCH_CHAIN)}
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
