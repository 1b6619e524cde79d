"""`dovetail bench target`: our target-only decode speed against HF transformers and llama.cpp, same run.

Every engine gets the same prompt token ids, greedy decoding and the same number of new tokens (EOS
ignored); all engines are loaded in this process (a few GB at most) and run round-robin, one at a time, so they
never compete for the two cores and a slow spell of a shared machine hits them alike. Speeds are the
best of `--repeats` rounds, decode steps only. The ratios matter more than the absolute numbers; the
bytes each token reads and the machine's read bandwidth put our speed against the hardware.

This module is imported when the CLI parser is built: it imports JAX and the engines only inside `run`.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dovetail_jax.bench import report
from dovetail_jax.bench.report import fmt, median, ratio
from dovetail_jax.bench.results import write_json_atomic

if TYPE_CHECKING:
    from dovetail_jax.devices import Placement

DEFAULT_PROMPT = "def fibonacci(n):"
DEFAULT_OUT = Path("analysis/results/bench_target.json")
SCHEMA = "dovetail.bench.target/1"
GOALS = {"ours_over_hf": 2.0, "ours_over_llama_cpp_f32": 0.75}


@dataclass(frozen=True)
class TargetBenchOptions:
    """What `dovetail bench target` measures and where it writes."""

    model: str | None = None  # a GGUF file or HF folder; None: the embedded default
    tokenizer: str | None = None
    prompt: str = DEFAULT_PROMPT  # raw text, no chat template
    max_new_tokens: int = 128  # per run, EOS ignored
    repeats: int = 10  # timed rounds; each engine's best is reported
    out: Path = DEFAULT_OUT
    hf: bool = True  # also time HF transformers
    llama_cpp: bool = True  # also time llama.cpp
    json: bool = False  # print the JSON to stdout as well (the table then goes to stderr)
    placement: Placement | None = None  # where our target runs; None: `devices.placement()`


_say = report.sayer("bench target")


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

    def __init__(self, opts: TargetBenchOptions) -> None:
        from dovetail_jax import api

        self.api = api
        _say(f"dovetail-jax: loading {opts.model or 'the default model'}")
        self.target = api.load_target(opts.model, tokenizer=opts.tokenizer, placement=opts.placement)
        self.ids = api.encode_prompt(self.target, opts.prompt)
        self.n = opts.max_new_tokens
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
        slots = s.cache_slots
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


def _hf_skip(enabled: bool, model: Path) -> str | None:
    if not enabled:
        return "--no-hf"
    if model.is_file() and importlib.util.find_spec("accelerate") is None:
        return "accelerate is not installed (transformers needs it to load a GGUF file)"
    return None


def _llama_skip(enabled: bool, model: Path) -> str | None:
    if not enabled:
        return "--no-llama-cpp"
    if not model.is_file():
        return "the model is not a GGUF file (llama.cpp needs one)"
    return None


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
        rows.append(f"{label:<24}{fmt(e['decode_tok_s'], '.1f'):>13}{fmt(e['total_tok_s'], '.1f'):>12}"
                    f"{fmt(e['prefill_s'], '.3f'):>10}{fmt(e['load_s'], '.1f'):>8}"
                    f"{fmt(e.get('compile_s'), '.1f'):>10}")
    r = res["ratios"]
    for key, label in (("ours_over_hf", "ours / hf"), ("ours_over_llama_cpp_f32", "ours / llama.cpp f32")):
        met = r["meets_goal"][key]
        verdict = "n/a" if met is None else ("met" if met else "NOT met")
        rows.append(f"{label}: {fmt(r[key], '.2f')} best of rounds (goal >= {GOALS[key]}: {verdict}); "
                    f"median of rounds {fmt(r['median_of_runs'][key], '.2f')}")
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


def _start_peers(opts: TargetBenchOptions, model_path: Path, ids: list[int]) -> dict[str, tuple[Any, str | None]]:
    """engine name -> (loaded and warmed-up peer engine or None, why it does not run)."""
    from dovetail_jax.bench import peers

    n = opts.max_new_tokens
    return {
        "hf_transformers": _start_peer("hf transformers", _hf_skip(opts.hf, model_path), "transformers",
                                       lambda: peers.HFEngine(model_path, ids, n)),
        "llama_cpp_f32": _start_peer("llama.cpp", _llama_skip(opts.llama_cpp, model_path), "llama_cpp",
                                     lambda: peers.LlamaCppRounds(model_path, opts.prompt, ids, n)),
    }


def _rounds(ours: OursEngine, others: list[Any], repeats: int) -> dict[str, str]:
    """Run every engine once per round, back to back, so a slow spell of this shared machine hits all engines
    alike instead of whichever happened to run then; returns why peers failed (ours failing is an error)."""
    from tqdm import tqdm

    engines = [ours, *others]
    failed: dict[str, str] = {}
    for _ in tqdm(range(repeats), desc="rounds (" + ", ".join(e.name for e in engines) + ")", file=sys.stderr,
                  unit="round"):
        for e in list(engines):
            try:
                e.run_once()
            except Exception as exc:  # a peer crashing mid-run keeps what we have
                if e is ours:
                    raise
                failed[e.name] = f"failed: {type(exc).__name__}: {exc}"
                _say(f"{e.name} {failed[e.name]}")
                engines.remove(e)
    return failed


def _ratios(ours: dict[str, Any], hf: dict[str, Any] | None, lc: dict[str, Any] | None) -> dict[str, Any]:
    r_hf = ratio(ours["decode_tok_s"], hf and hf["decode_tok_s"])
    r_lc = ratio(ours["decode_tok_s"], lc and lc["decode_tok_s"])
    ours_median = median(ours["runs_decode_tok_s"])
    return {
        "ours_over_hf": r_hf,
        "ours_over_llama_cpp_f32": r_lc,
        "goals": GOALS,
        "median_of_runs": {
            "ours_over_hf": ratio(ours_median, hf and median(hf["runs_decode_tok_s"])),
            "ours_over_llama_cpp_f32": ratio(ours_median, lc and median(lc["runs_decode_tok_s"])),
        },
        "meets_goal": {k: None if r is None else r >= GOALS[k]
                       for k, r in (("ours_over_hf", r_hf), ("ours_over_llama_cpp_f32", r_lc))},
    }


def _bandwidth(ours: dict[str, Any], read_gbs: float) -> dict[str, Any]:
    bytes_per_token = ours["weight_bytes_per_token"] + ours["kv_bytes_per_token"]
    return {
        "weight_bytes_per_token": ours["weight_bytes_per_token"],
        "kv_bytes_per_token": ours["kv_bytes_per_token"],
        "kv_note": "the whole preallocated cache (cache_slots) is read each step: attention is masked, not sliced",
        "bytes_per_token": bytes_per_token,
        "effective_gbs": bytes_per_token * ours["decode_tok_s"] / 1e9,
        "machine_read_gbs": read_gbs,
        "fraction_of_machine_read": bytes_per_token * ours["decode_tok_s"] / 1e9 / read_gbs,
    }


def _print(res: dict[str, Any], opts: TargetBenchOptions) -> None:
    table = format_table(res) + f"\nwrote {opts.out}"
    print(table, file=sys.stderr if opts.json else sys.stdout)
    if opts.json:
        print(json.dumps(res, indent=1))


def run(opts: TargetBenchOptions) -> dict[str, Any]:
    """Measure all engines, write the JSON atomically to `opts.out`, print the table; returns the result."""
    from dovetail_jax import machine
    from dovetail_jax.io.registry import default_model_path

    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    model_path = Path(opts.model) if opts.model is not None else default_model_path()
    load_start = machine.load_average()
    engine = OursEngine(opts)
    model = engine.model_record()
    ids = model["prompt_ids"]
    _say("measuring the machine's memory read bandwidth")
    read_gbs = machine.memory_read_bandwidth_gbs()
    started_peers = _start_peers(opts, model_path, ids)
    failed = _rounds(engine, [e for e, _ in started_peers.values() if e is not None], opts.repeats)
    ours = engine.result() | {"load_average_1m_before": load_start}
    results = {k: e.result() if e is not None and k not in failed else None for k, (e, _) in started_peers.items()}
    skipped = {k: failed.get(k, skip) for k, (_, skip) in started_peers.items()}
    for e in (engine, *(e for e, _ in started_peers.values())):
        if e is not None:
            e.close()
    gc.collect()
    hf, lc = results["hf_transformers"], results["llama_cpp_f32"]
    eos = tuple(model["eos_ids"])
    res: dict[str, Any] = {
        "schema": SCHEMA,
        "timestamp": started,
        "command": report.command_line(),
        "model": {**{k: v for k, v in model.items() if k != "prompt_ids"}, "path": str(model_path)},
        "prompt": {"text": opts.prompt, "ids": ids, "tokens": len(ids)},
        "max_new_tokens": opts.max_new_tokens,
        "repeats": opts.repeats,
        "aggregate": "best of repeats, engines interleaved round-robin (after one untimed warm-up per engine)",
        "greedy": True,
        "ignore_eos": True,
        "machine": {**machine.machine_info(), "memory_read_gbs": read_gbs,
                    "load_average_1m": {"start": load_start, "end": machine.load_average()}},
        "engines": {"dovetail_jax": ours, **results},
        "skipped": skipped,
        "ratios": _ratios(ours, hf, lc),
        "bandwidth": _bandwidth(ours, read_gbs),
        "greedy_tokens_match": {"hf_transformers": _token_check(ours["token_ids"], hf and hf["token_ids"], eos),
                                "llama_cpp_f32": _token_check(ours["token_ids"], lc and lc["token_ids"], eos)},
    }
    write_json_atomic(Path(opts.out), res)
    _print(res, opts)
    return res
