"""`dovetail bench target`: our target-only decode speed against HF transformers and llama.cpp, same run.

Every engine gets the same prompt token ids, greedy decoding and the same number of new tokens (EOS
ignored); all engines are loaded in this process (a few GB at most) and run round-robin, one at a time, so they
never compete for the two cores and a slow spell of a shared machine hits them alike. Speeds are the
best of `--repeats` rounds, decode steps only. The ratios matter more than the absolute numbers; the
bytes each token reads and the machine's read bandwidth put our speed against the hardware.

This module is imported when the CLI parser is built: it imports JAX and the engines only inside `run`.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import shlex
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dovetail_jax.argtypes import nonempty_text, positive_int
from dovetail_jax.bench.results import write_json_atomic

DEFAULT_PROMPT = "def fibonacci(n):"
DEFAULT_OUT = Path("analysis/results/bench_target.json")
SCHEMA = "dovetail.bench.target/1"
GOALS = {"ours_over_hf": 2.0, "ours_over_llama_cpp_f32": 0.75}


def add_args(p: argparse.ArgumentParser) -> None:
    """Options of `dovetail bench target` (`--model` is added by the CLI)."""
    p.add_argument("--prompt", type=nonempty_text, default=DEFAULT_PROMPT,
                   help=f"raw prompt text, no chat template (default {DEFAULT_PROMPT!r})")
    p.add_argument("--max-new-tokens", type=positive_int, default=128, help="new tokens per run, EOS ignored (128)")
    p.add_argument("--repeats", type=positive_int, default=10,
                   help="timed rounds; each engine runs once per round and its best is reported (10)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON result file (default {DEFAULT_OUT})")
    p.add_argument("--no-hf", action="store_true", help="skip Hugging Face transformers")
    p.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp")
    p.add_argument("--json", action="store_true",
                   help="print the JSON to stdout as well (the table then goes to stderr)")


def _say(msg: str) -> None:
    print(f"[bench target] {msg}", file=sys.stderr, flush=True)


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token over the common length, None if that prefix is equal."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)


def _token_check(ours: list[int], peer: list[int] | None, eos_ids: tuple[int, ...]) -> dict[str, Any] | None:
    if peer is None:
        return None
    i = first_divergence(ours, peer)
    out: dict[str, Any] = {"compared": min(len(ours), len(peer)), "equal": i is None, "first_divergence": i}
    if i is not None and ours[i] in eos_ids:
        out["note"] = "ours chose EOS there; HF's min_new_tokens suppresses EOS, so this is not a numerical difference"
    return out


class OursEngine:
    """This project's target-only decoding, measured the way `dovetail generate` reports it."""

    name = "dovetail_jax"

    def __init__(self, args: argparse.Namespace) -> None:
        from dovetail_jax import api

        self.api = api
        _say(f"dovetail-jax: loading {args.model or 'the default model'}")
        self.target = api.load_target(args.model, tokenizer=args.tokenizer)
        self.ids = api.encode_prompt(self.target, args.prompt)
        self.n = args.max_new_tokens
        _say("dovetail-jax: compiling and warming up")
        self.warm = api.generate(self.target, self.ids, max_new_tokens=self.n, ignore_eos=True)
        self.runs: list[Any] = []

    def run_once(self) -> None:
        self.runs.append(self.api.generate(self.target, self.ids, max_new_tokens=self.n, ignore_eos=True))

    def model_record(self) -> dict[str, Any]:
        cfg = self.target.cfg
        return {"source": self.target.source, "name": cfg.name, "num_params": cfg.num_params,
                "eos_ids": list(self.target.eos_ids), "prompt_ids": self.ids}

    def result(self) -> dict[str, Any]:
        from dovetail_jax.model.params import weight_bytes

        best = max(self.runs, key=lambda r: r.stats.tokens_per_s)
        s = best.stats
        slots = int(s.extra["cache_slots"])
        return {
            "engine": "dovetail-jax target-only, float32",
            "decode_tok_s": s.tokens_per_s,
            "decode_method": "decode steps / decode time after prefill (GenerationStats.tokens_per_s), best run",
            "total_tok_s": s.new_tokens / (s.prefill_s + s.decode_s),
            "prefill_s": s.prefill_s,
            "compile_s": self.warm.stats.compile_s,
            "load_s": self.target.load_s,
            "runs_decode_tok_s": [r.stats.tokens_per_s for r in self.runs],
            "deterministic": all(r.token_ids == self.warm.token_ids for r in self.runs),
            "cache_slots": slots,
            "weight_bytes_per_token": weight_bytes(self.target.params),
            "kv_bytes_per_token": self.target.cfg.kv_bytes_per_token() * slots,
            "token_ids": best.token_ids,
            "text": best.text,
        }

    def close(self) -> None:
        del self.target, self.warm, self.runs


def _median(xs: list[float]) -> float | None:
    import statistics

    return statistics.median(xs) if xs else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _start_peer(name: str, skip: str | None, module: str | None,
                factory: Callable[[], Any]) -> tuple[Any | None, str | None]:
    """Load one peer engine unless skipped or not installed; failures become a recorded reason, not a crash."""
    if skip:
        return None, skip
    if module is not None and importlib.util.find_spec(module) is None:
        return None, f"{module} is not installed"
    _say(f"{name}: loading and warming up")
    try:
        return factory(), None
    except Exception as e:  # a peer's failure must not lose our own measurement
        _say(f"{name} failed: {type(e).__name__}: {e}")
        return None, f"failed: {type(e).__name__}: {e}"


def _hf_skip(args: argparse.Namespace, model: Path) -> str | None:
    if args.no_hf:
        return "--no-hf"
    if model.is_file() and importlib.util.find_spec("accelerate") is None:
        return "accelerate is not installed (transformers needs it to load a GGUF file)"
    return None


def _llama_skip(args: argparse.Namespace, model: Path) -> str | None:
    if args.no_llama_cpp:
        return "--no-llama-cpp"
    if not model.is_file():
        return "the model is not a GGUF file (llama.cpp needs one)"
    return None


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_table(res: dict[str, Any]) -> str:
    """The compact human summary printed at the end."""
    rows = [f"{'engine':<24}{'decode tok/s':>13}{'total tok/s':>12}{'prefill s':>10}{'load s':>8}{'compile s':>10}"]
    labels = {"dovetail_jax": "dovetail-jax (f32)", "hf_transformers": "HF transformers (f32)",
              "llama_cpp_f32": "llama.cpp (F32 GGUF)"}
    for key, label in labels.items():
        e = res["engines"][key]
        if e is None:
            rows.append(f"{label:<24}  skipped: {res['skipped'][key]}")
            continue
        rows.append(f"{label:<24}{_fmt(e['decode_tok_s'], '.1f'):>13}{_fmt(e['total_tok_s'], '.1f'):>12}"
                    f"{_fmt(e['prefill_s'], '.3f'):>10}{_fmt(e['load_s'], '.1f'):>8}"
                    f"{_fmt(e.get('compile_s'), '.1f'):>10}")
    r = res["ratios"]
    for key, label in (("ours_over_hf", "ours / hf"), ("ours_over_llama_cpp_f32", "ours / llama.cpp f32")):
        met = r["meets_goal"][key]
        verdict = "n/a" if met is None else ("met" if met else "NOT met")
        rows.append(f"{label}: {_fmt(r[key], '.2f')} best of rounds (goal >= {GOALS[key]}: {verdict}); "
                    f"median of rounds {_fmt(r['median_of_runs'][key], '.2f')}")
    b = res["bandwidth"]
    rows.append(f"bytes/token {b['bytes_per_token'] / 1e6:.1f} MB (weights {b['weight_bytes_per_token'] / 1e6:.1f} "
                f"+ KV {b['kv_bytes_per_token'] / 1e6:.1f}) -> {b['effective_gbs']:.1f} GB/s effective; "
                f"machine read {b['machine_read_gbs']:.1f} GB/s")
    for key, label in (("hf_transformers", "HF"), ("llama_cpp_f32", "llama.cpp f32")):
        t = res["greedy_tokens_match"][key]
        if t is not None:
            state = "equal" if t["equal"] else f"first divergence at token {t['first_divergence']}"
            rows.append(f"greedy tokens vs {label}: {state} ({t['compared']} compared)")
    return "\n".join(rows)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure all engines, write the JSON atomically to `args.out`, print the table; returns the result."""
    from tqdm import tqdm

    from dovetail_jax.bench import machine, peers
    from dovetail_jax.io.registry import default_model_path

    prog = Path(sys.argv[0]).name
    prog = "python -m dovetail_jax.cli" if prog in ("cli.py", "__main__.py") else prog
    command = " ".join([prog, shlex.join(sys.argv[1:])])
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    model_path = Path(args.model) if args.model is not None else default_model_path()
    n, repeats = args.max_new_tokens, args.repeats
    load_start = machine.load_average()

    engine = OursEngine(args)
    model = engine.model_record()
    ids = model["prompt_ids"]
    _say("measuring the machine's memory read bandwidth")
    read_gbs = machine.memory_read_bandwidth_gbs()

    hf_eng, hf_skip = _start_peer("hf transformers", _hf_skip(args, model_path), "transformers",
                                  lambda: peers.HFEngine(model_path, ids, n))
    lc_eng, lc_skip = _start_peer("llama.cpp", _llama_skip(args, model_path), "llama_cpp",
                                  lambda: peers.LlamaCppEngine(model_path, args.prompt, ids, n))
    engines = [e for e in (engine, hf_eng, lc_eng) if e is not None]
    # Round-robin: every round runs each engine once, back to back, so a slow spell of this shared machine
    # hits all engines alike instead of whichever happened to run then.
    failed: dict[str, str] = {}
    for _ in tqdm(range(repeats), desc="rounds (" + ", ".join(e.name for e in engines) + ")", file=sys.stderr,
                  unit="round"):
        for e in list(engines):
            try:
                e.run_once()
            except Exception as exc:  # a peer crashing mid-run keeps what we have
                if e is engine:
                    raise
                failed[e.name] = f"failed: {type(exc).__name__}: {exc}"
                _say(f"{e.name} {failed[e.name]}")
                engines.remove(e)
    ours = engine.result()
    ours["load_average_1m_before"] = load_start
    hf = hf_eng.result() if hf_eng is not None and hf_eng.name not in failed else None
    lc = lc_eng.result() if lc_eng is not None and lc_eng.name not in failed else None
    hf_skip = failed.get("hf_transformers", hf_skip)
    lc_skip = failed.get("llama_cpp_f32", lc_skip)
    for e in (engine, hf_eng, lc_eng):
        if e is not None:
            e.close()
    gc.collect()

    ours_tps = ours["decode_tok_s"]
    r_hf = _ratio(ours_tps, hf and hf["decode_tok_s"])
    r_lc = _ratio(ours_tps, lc and lc["decode_tok_s"])
    bytes_per_token = ours["weight_bytes_per_token"] + ours["kv_bytes_per_token"]
    eos = tuple(model["eos_ids"])
    res: dict[str, Any] = {
        "schema": SCHEMA,
        "timestamp": started,
        "command": command,
        "model": {**{k: v for k, v in model.items() if k != "prompt_ids"}, "path": str(model_path)},
        "prompt": {"text": args.prompt, "ids": ids, "tokens": len(ids)},
        "max_new_tokens": n,
        "repeats": repeats,
        "aggregate": "best of repeats, engines interleaved round-robin (after one untimed warm-up per engine)",
        "greedy": True,
        "ignore_eos": True,
        "machine": {**machine.machine_info(), "memory_read_gbs": read_gbs,
                    "load_average_1m": {"start": load_start, "end": machine.load_average()}},
        "engines": {"dovetail_jax": ours, "hf_transformers": hf, "llama_cpp_f32": lc},
        "skipped": {"hf_transformers": hf_skip, "llama_cpp_f32": lc_skip},
        "ratios": {
            "ours_over_hf": r_hf,
            "ours_over_llama_cpp_f32": r_lc,
            "goals": GOALS,
            "median_of_runs": {
                "ours_over_hf": _ratio(_median(ours["runs_decode_tok_s"]), hf and _median(hf["runs_decode_tok_s"])),
                "ours_over_llama_cpp_f32": _ratio(_median(ours["runs_decode_tok_s"]),
                                                  lc and _median(lc["runs_decode_tok_s"])),
            },
            "meets_goal": {k: None if r is None else r >= GOALS[k]
                           for k, r in (("ours_over_hf", r_hf), ("ours_over_llama_cpp_f32", r_lc))},
        },
        "bandwidth": {
            "weight_bytes_per_token": ours["weight_bytes_per_token"],
            "kv_bytes_per_token": ours["kv_bytes_per_token"],
            "kv_note": "the whole preallocated cache (cache_slots) is read each step: attention is masked, not sliced",
            "bytes_per_token": bytes_per_token,
            "effective_gbs": bytes_per_token * ours_tps / 1e9,
            "machine_read_gbs": read_gbs,
            "fraction_of_machine_read": bytes_per_token * ours_tps / 1e9 / read_gbs,
        },
        "greedy_tokens_match": {
            "hf_transformers": _token_check(ours["token_ids"], hf and hf["token_ids"], eos),
            "llama_cpp_f32": _token_check(ours["token_ids"], lc and lc["token_ids"], eos),
        },
    }
    text = json.dumps(res, indent=1)
    write_json_atomic(Path(args.out), res)
    table = format_table(res) + f"\nwrote {args.out}"
    print(table, file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(text)
    return res
