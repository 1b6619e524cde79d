"""`dovetail bench dovetail`: Dovetail decoding on the paper's evaluation prompts (HumanEval, MT-bench).

One target is loaded (the `[in, out]` layout a tree verifier wants, as `generate --mode dovetail` uses) and
serves both the target-only baseline and every Dovetail configuration; each draft is loaded once. Every prompt
goes through the chat template and is decoded round-robin: target-only, each configuration, then llama.cpp on
the same weights as an F32 GGUF, so a slow spell of this shared machine hits all methods of that prompt alike.
One warm-up generation per method on the first prompt runs before anything is timed; a prompt of a new length
bucket compiles inside its own call, outside the timed region (`compile_s`).

Generations stop at EOS as `dovetail generate` does, so answers are natural; llama.cpp makes exactly as many
tokens as target-only did for that prompt. Tokens are counted alike for all methods: decode tok/s is
Σ(new tokens − 1) / Σ decode time (the first token comes from the prefill), wall tok/s is Σ new tokens /
Σ(prefill + decode). Every aggregate pools counts over prompts (Σcommitted / Σcycles, Σaccepted at depth d /
Σcycles reaching depth d, Σtokens / Σseconds), never a mean of per-prompt ratios.

The JSON is rewritten atomically after every prompt ("complete": false until the end), so an interrupted run
keeps what it measured. This module is imported when the CLI parser is built: JAX and the engines are imported
only inside `run`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dovetail_jax.argtypes import positive_int
from dovetail_jax.bench import eval_prompts
from dovetail_jax.bench.results import write_json_atomic
from dovetail_jax.config import TREE_PRESETS, DraftConfig, SamplingConfig, TreeConfig
from dovetail_jax.errors import ConfigError, DovetailError, ModelFormatError

DEFAULT_OUT = Path("analysis/results/bench_dovetail.json")
DEFAULT_DATASETS = "humaneval,mtbench"
SCHEMA = "dovetail.bench.dovetail/1"
RESERVED_NAMES = ("target", "llama_cpp_f32")
CONFIG_KEYS = {"name", "draft", "tree", "draft_layers", "draft_fusion", "draft_vocab"}
TREE_KEYS = ("top_k", "depth", "total_tokens")
RANDOM_KEYS = ("draft_layers", "draft_fusion", "draft_vocab")


def add_args(p: argparse.ArgumentParser) -> None:
    """Options of `dovetail bench dovetail` (the CLI adds --model, the sampling and the single-config draft/tree
    options)."""
    p.add_argument("--datasets", default=DEFAULT_DATASETS,
                   help=f"comma-separated evaluation sets among {', '.join(eval_prompts.DATASETS)} "
                        f"(default {DEFAULT_DATASETS})")
    p.add_argument("--limit", type=positive_int, default=20,
                   help="prompts per dataset, the first N in file order (default 20)")
    p.add_argument("--max-new-tokens", type=positive_int, default=128,
                   help="new tokens per prompt at most; generation stops at EOS (default 128)")
    p.add_argument("--configs", metavar="FILE", type=Path, default=None,
                   help='JSON list of {"name", "draft": path | "self" | "random" | null (the default draft), '
                        '"tree": preset name | {"top_k", "depth", "total_tokens"}} (optional "draft_layers", '
                        '"draft_fusion", "draft_vocab" shape a random draft); replaces --draft and the tree options')
    p.add_argument("--llama-cpp", action=argparse.BooleanOptionalAction, default=None,
                   help="also time llama.cpp on the same weights as an F32 GGUF (default: on when llama_cpp is "
                        "installed and the model is a GGUF file)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON result file (default {DEFAULT_OUT})")


def _say(msg: str) -> None:
    print(f"[bench dovetail] {msg}", file=sys.stderr, flush=True)


# --- configurations ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunConfig:
    """One Dovetail configuration: a draft (path, "self", "random" or None for the default) and a tree."""

    name: str
    draft: str | None
    tree: TreeConfig
    random_cfg: DraftConfig  # the random draft's shape ("random", or None when no draft is shipped)

    @property
    def draft_key(self) -> tuple[str | None, DraftConfig | None]:
        """Configurations with equal keys share one loaded draft."""
        return self.draft, (self.random_cfg if self.draft in (None, "random") else None)

    def to_dict(self) -> dict[str, Any]:
        r = self.random_cfg
        return {"name": self.name, "draft": self.draft,
                "tree": {"top_k": self.tree.top_k, "depth": self.tree.depth, "total_tokens": self.tree.total_tokens},
                "random_draft": {"num_layers": r.num_layers, "fusion": r.fusion, "draft_vocab_size": r.draft_vocab_size}
                if self.draft in (None, "random") else None}


def parse_datasets(s: str) -> list[str]:
    names = list(dict.fromkeys(x.strip().lower() for x in s.split(",") if x.strip()))
    bad = [n for n in names if n not in eval_prompts.DATASETS]
    if bad or not names:
        raise ConfigError(f"unknown dataset {bad[0]!r} in --datasets; choose among {', '.join(eval_prompts.DATASETS)}"
                          if bad else "--datasets names no dataset")
    return names


def _tree_from_spec(spec: Any, where: str, default: TreeConfig) -> TreeConfig:
    if spec is None:
        return default
    if isinstance(spec, str):
        if spec not in TREE_PRESETS:
            raise ConfigError(f"{where}: unknown tree preset {spec!r}; choose among {', '.join(sorted(TREE_PRESETS))} "
                              f"or give {{\"top_k\", \"depth\", \"total_tokens\"}}")
        return TREE_PRESETS[spec]
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: 'tree' must be a preset name or an object with {', '.join(TREE_KEYS)}")
    extra = sorted(set(spec) - set(TREE_KEYS))
    if extra:
        raise ConfigError(f"{where}: unknown tree key {extra[0]!r} (expected {', '.join(TREE_KEYS)})")
    vals = {}
    for k in TREE_KEYS:
        v = spec.get(k, getattr(TreeConfig(), k))
        if not isinstance(v, int) or isinstance(v, bool):
            raise ConfigError(f"{where}: tree {k} must be an integer, got {v!r}")
        vals[k] = v
    try:
        return TreeConfig(**vals)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def _random_cfg(layers: Any, fusion: Any, vocab: Any, where: str) -> DraftConfig:
    for key, v in (("draft_layers", layers), ("draft_vocab", vocab)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ConfigError(f"{where}: {key} must be a positive integer, got {v!r}")
    if fusion is not None and fusion not in ("dgf", "eagle"):
        raise ConfigError(f"{where}: draft_fusion must be 'dgf' or 'eagle', got {fusion!r}")
    return DraftConfig(num_layers=layers or 1, fusion=fusion or "dgf", draft_vocab_size=vocab)


def _draft_label(draft: str | None) -> str:
    return "default" if draft is None else draft if draft in ("self", "random") else Path(draft).name or draft


def configs_from_args(args: argparse.Namespace) -> list[RunConfig]:
    """The single configuration that --draft / --tree / --tree-top-k / ... describe (as `generate` reads them)."""
    from dovetail_jax.cli import tree_from_args

    random_opts = [f for f in RANDOM_KEYS if getattr(args, f, None) is not None]
    draft = args.draft
    if draft not in (None, "random") and random_opts:
        raise ConfigError(f"--{random_opts[0].replace('_', '-')} shapes a random draft; it cannot change --draft")
    if draft is None and random_opts:
        draft = "random"  # as in `generate`: shaping options ask for a random draft
    rcfg = _random_cfg(args.draft_layers, args.draft_fusion, args.draft_vocab, "options")
    tree = tree_from_args(args)
    name = f"{_draft_label(draft)}-{tree.top_k}-{tree.depth}-{tree.total_tokens}"
    return [RunConfig(name, draft, tree, rcfg)]


def parse_configs(data: Any, where: str, default_tree: TreeConfig = TreeConfig()) -> list[RunConfig]:
    """Validate a configs list (the parsed JSON of --configs)."""
    if not isinstance(data, list) or not data:
        raise ConfigError(f"{where}: expected a non-empty JSON list of configurations")
    out: list[RunConfig] = []
    for i, c in enumerate(data):
        at = f"{where}: configuration {i}"
        if not isinstance(c, dict):
            raise ConfigError(f"{at}: expected an object, got {type(c).__name__}")
        extra = sorted(set(c) - CONFIG_KEYS)
        if extra:
            raise ConfigError(f"{at}: unknown key {extra[0]!r} (expected {', '.join(sorted(CONFIG_KEYS))})")
        name = c.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{at}: 'name' must be a non-empty string")
        at = f"{where}: configuration {name!r}"
        if name in RESERVED_NAMES:
            raise ConfigError(f"{at}: the names {', '.join(RESERVED_NAMES)} are reserved for the baselines")
        if any(r.name == name for r in out):
            raise ConfigError(f"{at}: duplicate name")
        draft = c.get("draft")
        if draft is not None and (not isinstance(draft, str) or not draft.strip()):
            raise ConfigError(f"{at}: 'draft' must be a path, \"self\", \"random\" or null")
        shaping = [k for k in RANDOM_KEYS if c.get(k) is not None]
        if shaping and draft not in (None, "random"):
            raise ConfigError(f"{at}: {shaping[0]} shapes a random draft; it cannot change draft {draft!r}")
        rcfg = _random_cfg(c.get("draft_layers"), c.get("draft_fusion"), c.get("draft_vocab"), at)
        out.append(RunConfig(name, draft, _tree_from_spec(c.get("tree"), at, default_tree), rcfg))
    return out


def load_configs_file(path: Path) -> list[RunConfig]:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"--configs {path}: cannot read ({e.strerror or e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--configs {path}: not valid JSON ({e})") from None
    return parse_configs(data, str(path))


def resolve_configs(args: argparse.Namespace) -> list[RunConfig]:
    if args.configs is None:
        return configs_from_args(args)
    single = [f for f in ("draft", "tree", "tree_top_k", "depth", "total_tokens", *RANDOM_KEYS)
              if getattr(args, f, None) is not None]
    if single:
        raise ConfigError(f"--configs replaces --{single[0].replace('_', '-')}; give one or the other")
    return load_configs_file(args.configs)


# --- pooling (pure functions over per-prompt records) ---------------------------------------------------------


def _rate(n: float, seconds: float) -> float | None:
    return n / seconds if seconds > 0 else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def pool_acceptance(hists: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Pool acceptance histograms (index = tokens committed in a cycle − 1) of many runs.

    tau = Σcommitted / Σcycles; the rate at depth d+1 = cycles that accepted ≥ d+1 drafts / cycles that accepted
    ≥ d (those that reached depth d+1), the same quantity `decode/dovetail.py` reports for one run, here from
    pooled counts (None where no cycle reached that depth).
    """
    width = max((len(h) for h in hists), default=0)
    total = [sum(int(h[i]) for h in hists if i < len(h)) for i in range(width)]
    cycles = sum(total)
    committed = sum((i + 1) * c for i, c in enumerate(total))
    reached = [sum(total[d:]) for d in range(width)]  # cycles that accepted >= d drafts
    rates = [reached[d + 1] / reached[d] if reached[d] else None for d in range(width - 1)]
    return {"cycles": cycles, "committed": committed, "tau": committed / cycles if cycles else None,
            "accept_hist": total, "depth_accept_rates": rates, "depth_reached": reached[:-1],
            "depth_accepted": reached[1:]}


def summarize_runs(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Pooled token and time totals of one method's runs (records with tokens, decode_steps, decode_s, prefill_s)."""
    tokens = sum(r["tokens"] for r in runs)
    steps = sum(r["decode_steps"] for r in runs)
    decode = sum(r["decode_s"] for r in runs)
    prefill = sum(r["prefill_s"] for r in runs)
    return {"n_prompts": len(runs), "tokens": tokens, "decode_steps": steps, "decode_s": decode, "prefill_s": prefill,
            "decode_tok_s": _rate(steps, decode), "wall_tok_s": _rate(tokens, prefill + decode),
            "compile_s": sum(r.get("compile_s", 0.0) for r in runs)}


def summarize_config(records: Sequence[dict[str, Any]], name: str, greedy: bool) -> dict[str, Any]:
    """One configuration over a dataset's prompt records, against the target-only and llama.cpp runs of the same
    prompts."""
    recs = [r for r in records if name in r["configs"]]
    runs = [r["configs"][name] for r in recs]
    dt = summarize_runs(runs)
    tg = summarize_runs([r["target"] for r in recs])
    acc = pool_acceptance([r["accept_hist"] for r in runs])
    cycles = acc["cycles"]
    split = {k: sum(r["time_s"][k] for r in runs) for k in ("verify", "draft", "transfer", "host")}
    pre_split: dict[str, float] = {}
    for r in runs:
        for k, v in r["prefill_time_s"].items():
            pre_split[k] = pre_split.get(k, 0.0) + v
    b_draft = sum(r["bytes_to_draft"] for r in runs)
    b_target = sum(r["bytes_to_target"] for r in runs)
    b_pre = sum(r["prefill_bytes_to_draft"] for r in runs)
    n_draft = sum(r["transfers_to_draft"] for r in runs) - len(runs)  # one prompt-feature transfer per prompt
    n_target = sum(r["transfers_to_target"] for r in runs)
    with_lc = [r for r in recs if r.get("llama_cpp_f32")]
    lc = summarize_runs([r["llama_cpp_f32"] for r in with_lc]) if with_lc else None
    dt_on_lc = summarize_runs([r["configs"][name] for r in with_lc]) if with_lc else None
    identical = sum(1 for r in runs if r["identical"]) if greedy else None
    return {
        "n_prompts": dt["n_prompts"],
        "tokens": dt["tokens"],
        "decode_steps": dt["decode_steps"],
        **acc,
        "decode_tok_s": dt["decode_tok_s"],
        "wall_tok_s": dt["wall_tok_s"],
        "target_decode_tok_s": tg["decode_tok_s"],
        "target_wall_tok_s": tg["wall_tok_s"],
        "speedup": _ratio(dt["decode_tok_s"], tg["decode_tok_s"]),
        "speedup_wall": _ratio(dt["wall_tok_s"], tg["wall_tok_s"]),
        "time_s": {**split, "decode": dt["decode_s"], "prefill": dt["prefill_s"]},
        "per_cycle_ms": {**{k: v / cycles * 1e3 for k, v in split.items()}, "decode": dt["decode_s"] / cycles * 1e3}
        if cycles else None,
        "prefill_ms_per_prompt": dt["prefill_s"] / len(runs) * 1e3 if runs else None,
        "prefill_split_s": pre_split,
        "compile_s": dt["compile_s"],
        "bytes": {
            "to_draft": b_draft, "to_target": b_target, "prefill_to_draft": b_pre,
            "transfers_to_draft": n_draft + len(runs), "transfers_to_target": n_target,
            "per_transfer_to_draft": (b_draft - b_pre) / n_draft if n_draft > 0 else None,
            "per_transfer_to_target": b_target / n_target if n_target else None,
            "per_token": (b_draft + b_target) / dt["tokens"] if dt["tokens"] else None,
        },
        "llama_cpp_f32_tok_s": lc and lc["decode_tok_s"],
        "over_llama_cpp_f32": _ratio(dt_on_lc and dt_on_lc["decode_tok_s"], lc and lc["decode_tok_s"]),
        "llama_cpp_n_prompts": len(with_lc),
        "greedy_identical": identical,
    }


def summarize_dataset(records: Sequence[dict[str, Any]], names: Sequence[str], greedy: bool) -> dict[str, Any]:
    with_lc = [r["llama_cpp_f32"] for r in records if r.get("llama_cpp_f32")]
    lc = summarize_runs(with_lc) if with_lc else None
    if lc is not None:
        lc["tokens_equal_target"] = sum(1 for r in with_lc if r.get("tokens_equal_target"))
    return {
        "n_prompts": len(records),
        "target": summarize_runs([r["target"] for r in records]),
        "llama_cpp_f32": lc,
        "configs": {n: summarize_config(records, n, greedy) for n in names},
    }


# --- per-prompt records ---------------------------------------------------------------------------------------


def target_record(out: Any) -> dict[str, Any]:
    s = out.stats
    return {"tokens": s.new_tokens, "decode_steps": s.decode_steps, "decode_s": s.decode_s, "prefill_s": s.prefill_s,
            "compile_s": s.compile_s, "tok_s": s.tokens_per_s, "stop": s.stop_reason}


def dovetail_record(out: Any, reference: list[int] | None) -> dict[str, Any]:
    """A Dovetail run's numbers; `identical` compares its tokens with target-only's (greedy only)."""
    x = out.stats.extra
    return {
        **target_record(out),
        "cycles": x["cycles"], "tau": x["tau"], "accept_hist": list(x["accept_hist"]),
        "time_s": dict(x["time_s"]), "prefill_time_s": dict(x["prefill_time_s"]),
        "bytes_to_draft": x["bytes_to_draft"], "bytes_to_target": x["bytes_to_target"],
        "prefill_bytes_to_draft": x["prefill_bytes_to_draft"],
        "transfers_to_draft": x["transfers_to_draft"], "transfers_to_target": x["transfers_to_target"],
        "identical": None if reference is None else list(out.token_ids) == list(reference),
    }


class LlamaCppRunner:
    """llama.cpp greedy decoding on the F32 copy of the target's GGUF, any prompt, a given token count.

    decode time = first to last generated token (n − 1 decode steps), prefill = start to the first token, as our
    own decoders count them.
    """

    def __init__(self, model: Path, n_ctx: int) -> None:
        import os

        import llama_cpp
        from llama_cpp import Llama

        from dovetail_jax.bench.peers import cached_f32_gguf

        self.lc = llama_cpp
        self.f32, self.convert_s = cached_f32_gguf(model)
        self.threads = os.cpu_count() or 1
        t0 = time.perf_counter()
        self.llm = Llama(model_path=str(self.f32), n_ctx=n_ctx, n_threads=self.threads, n_threads_batch=self.threads,
                         verbose=False)
        self.load_s = time.perf_counter() - t0

    def info(self) -> dict[str, Any]:
        return {"engine": f"llama-cpp-python {self.lc.__version__}, F32 GGUF", "gguf_f32": str(self.f32),
                "convert_s": self.convert_s, "load_s": self.load_s, "threads": self.threads,
                "tokens": "as many as target-only made for the prompt (EOS not checked)", "greedy": True}

    def run(self, prompt_ids: list[int], n: int, reference: list[int] | None) -> dict[str, Any]:
        self.llm.reset()  # no KV prefix reuse between prompts
        stamps, toks = [], []
        start = time.perf_counter()
        for tok in self.llm.generate(prompt_ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
            stamps.append(time.perf_counter())
            toks.append(int(tok))
            if len(toks) >= n:
                break
        decode = stamps[-1] - stamps[0]
        return {"tokens": len(toks), "decode_steps": len(toks) - 1, "decode_s": decode,
                "prefill_s": stamps[0] - start, "tok_s": _rate(len(toks) - 1, decode),
                "tokens_equal_target": None if reference is None else toks == list(reference)}

    def close(self) -> None:
        self.llm.close()


# --- the run --------------------------------------------------------------------------------------------------


def _command() -> str:
    prog = Path(sys.argv[0]).name
    prog = "python -m dovetail_jax.cli" if prog in ("cli.py", "__main__.py") else prog
    return " ".join([prog, shlex.join(sys.argv[1:])])


def _llama_plan(args: argparse.Namespace, model_path: Path) -> str | None:
    """None when llama.cpp runs, else why not; an explicit --llama-cpp that cannot run is an error."""
    reason = None
    if importlib.util.find_spec("llama_cpp") is None:
        reason = "llama_cpp is not installed (pip install -e '.[bench]')"
    elif not model_path.is_file():
        reason = "the model is not a GGUF file (llama.cpp needs one)"
    if args.llama_cpp is False:
        return "--no-llama-cpp"
    if reason and args.llama_cpp:
        raise ConfigError(f"--llama-cpp: {reason}")
    return reason


def _load_draft(api: Any, target: Any, c: RunConfig, seed: int) -> Any:
    try:
        if c.draft == "random":
            return api.random_draft(target, c.random_cfg, seed=seed)
        return api.load_draft(target, c.draft, fallback_random=c.random_cfg, seed=seed)
    except DovetailError as e:
        raise type(e)(f"configuration {c.name!r}: draft {c.draft!r}: {e}") from None
    except Exception as e:  # any failure to load a user-given draft is bad input, not a crash
        raise ModelFormatError(f"configuration {c.name!r}: cannot load draft {c.draft!r} "
                               f"({type(e).__name__}: {e})") from None


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_table(res: dict[str, Any]) -> str:
    rows = []
    head = (f"{'config':<24}{'n':>4}{'tokens':>8}{'tau':>6}{'tok/s':>8}{'target':>8}{'speedup':>8}{'wall x':>7}"
            f"{'llama.cpp':>10}{'/llama':>7}{'identical':>10}")
    for ds, r in res["results"].items():
        rows.append(f"{ds}: {r['n_prompts']} prompts; target-only {_fmt(r['target']['decode_tok_s'], '.1f')} tok/s"
                    + (f", llama.cpp F32 {_fmt(r['llama_cpp_f32']['decode_tok_s'], '.1f')} tok/s"
                       if r["llama_cpp_f32"] else ""))
        rows.append(head)
        for name, c in r["configs"].items():
            ident = "-" if c["greedy_identical"] is None else f"{c['greedy_identical']}/{c['n_prompts']}"
            rows.append(f"{name[:23]:<24}{c['n_prompts']:>4}{c['tokens']:>8}{_fmt(c['tau'], '.2f'):>6}"
                        f"{_fmt(c['decode_tok_s'], '.1f'):>8}{_fmt(c['target_decode_tok_s'], '.1f'):>8}"
                        f"{_fmt(c['speedup'], '.2f'):>8}{_fmt(c['speedup_wall'], '.2f'):>7}"
                        f"{_fmt(c['llama_cpp_f32_tok_s'], '.1f'):>10}{_fmt(c['over_llama_cpp_f32'], '.2f'):>7}"
                        f"{ident:>10}")
            pc = c["per_cycle_ms"]
            if pc:
                rows.append(f"{'':<4}per cycle: verify {pc['verify']:.1f} ms, draft {pc['draft']:.1f}, "
                            f"transfer {pc['transfer']:.2f}, host {pc['host']:.2f}; "
                            f"depth rates {', '.join(_fmt(x, '.2f') for x in c['depth_accept_rates'])}")
    return "\n".join(rows)


def _postfix(summary: dict[str, Any]) -> str:
    parts = []
    for name, c in summary["configs"].items():
        parts.append(f"{name[:16]} tau {_fmt(c['tau'], '.2f')} x{_fmt(c['speedup'], '.2f')}")
    return "; ".join(parts)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark, rewriting `args.out` after every prompt; returns the final result."""
    datasets = parse_datasets(args.datasets)
    configs = resolve_configs(args)
    sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    greedy = sampling.greedy
    prompts = {ds: eval_prompts.load_dataset(ds)[: args.limit] for ds in datasets}

    from tqdm import tqdm

    from dovetail_jax import api
    from dovetail_jax.bench import machine
    from dovetail_jax.decode import dovetail as dovetail_lib
    from dovetail_jax.decode.target_only import plan_sizes
    from dovetail_jax.io.registry import default_model_path

    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    load_start = machine.load_average()
    model_path = Path(args.model).expanduser() if args.model is not None else default_model_path()
    lc_skip = _llama_plan(args, model_path)
    n = args.max_new_tokens

    _say(f"loading the target ({args.model or 'default'}, [in, out] layout)")
    target = api.load_target(args.model, layout="in_out", tokenizer=args.tokenizer)
    # the baseline decodes with its own fastest layout, [out, in] (single-token steps), as `generate` does
    baseline = api.load_target(args.model, layout="out_in", tokenizer=args.tokenizer)
    encoded = {ds: [(pid, api.encode_prompt(target, text, chat=True)) for pid, text in ps]
               for ds, ps in prompts.items()}
    longest = max(len(ids) for ps in encoded.values() for _, ids in ps)
    for ds, ps in encoded.items():  # refuse before any timing what would overflow the context later
        for pid, ids in ps:
            plan_sizes(target.cfg, len(ids), n)
            for c in configs:
                try:
                    dovetail_lib.plan(target.cfg, c.tree, len(ids), n)
                except ConfigError as e:
                    raise ConfigError(f"{ds} prompt {pid}, configuration {c.name!r}: {e}") from None

    drafts: dict[tuple, Any] = {}
    draft_info: dict[str, dict[str, Any]] = {}
    for c in configs:
        t0 = time.perf_counter()
        if c.draft_key not in drafts:
            _say(f"loading draft {_draft_label(c.draft)} for {c.name}")
            drafts[c.draft_key] = _load_draft(api, target, c, args.seed)
        d = drafts[c.draft_key]
        try:
            dovetail_lib.check_draft(target.cfg, d, c.tree)
        except ConfigError as e:
            raise ConfigError(f"configuration {c.name!r}: {e}") from None
        draft_info[c.name] = {**c.to_dict(), "draft_source": d.source, "draft_layers": d.cfg.num_layers,
                              "draft_fusion": d.cfg.fusion, "draft_vocab": int(d.shared.head.shape[0]),
                              "load_s": time.perf_counter() - t0}
        if d.source.startswith("random"):
            _say(f"note: {c.name} uses an untrained ({d.source}) draft: lossless, but few drafts are accepted")

    llama = None
    if lc_skip is None:
        _say("llama.cpp: loading the F32 GGUF (converted once, then cached)")
        try:
            llama = LlamaCppRunner(model_path, n_ctx=max(512, longest + n + 16))
        except Exception as e:  # the peer's failure must not lose our own measurement
            lc_skip = f"failed: {type(e).__name__}: {e}"
            _say(f"llama.cpp {lc_skip}")

    def sampling_for(i: int) -> SamplingConfig:
        return SamplingConfig(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                              seed=sampling.seed + i)

    def gen(ids: list[int], i: int, c: RunConfig | None) -> Any:
        if c is None:
            return api.generate(baseline, ids, max_new_tokens=n, sampling=sampling_for(i))
        return api.generate(target, ids, max_new_tokens=n, sampling=sampling_for(i), draft=drafts[c.draft_key],
                            tree=c.tree)

    # warm-up: one untimed generation per method on the first prompt (compiles, first executions, allocations)
    first_ids = next(iter(encoded.values()))[0][1]
    _say("warming up (one untimed generation per method on the first prompt)")
    warm = {"target": gen(first_ids, 0, None).stats.compile_s}
    for c in configs:
        warm[c.name] = gen(first_ids, 0, c).stats.compile_s
    if llama is not None:
        try:
            llama.run(first_ids, min(8, n), None)
        except Exception as e:
            lc_skip = f"failed: {type(e).__name__}: {e}"
            _say(f"llama.cpp {lc_skip}")
            llama.close()
            llama = None

    names = [c.name for c in configs]
    records: dict[str, list[dict[str, Any]]] = {ds: [] for ds in datasets}
    res: dict[str, Any] = {
        "schema": SCHEMA,
        "complete": False,
        "timestamp": started,
        "command": _command(),
        "machine": {**machine.machine_info(), "load_average_1m": {"start": load_start, "end": None}},
        "model": {"source": target.source, "path": str(model_path), "name": target.cfg.name,
                  "num_params": target.cfg.num_params, "layout": "in_out (dovetail), out_in (target-only)",
                  "load_s": target.load_s,
                  "eos_ids": list(target.eos_ids)},
        "settings": {
            "datasets": datasets, "limit": args.limit, "max_new_tokens": n, "chat": True, "ignore_eos": False,
            "sampling": {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
                         "seed": sampling.seed, "seed_per_prompt": "seed + prompt index"},
            "greedy": greedy,
            "order": "per prompt, round-robin: target-only, each configuration, llama.cpp",
            "warmup": "one untimed generation per method on the first prompt; new length buckets compile "
                      "outside the timed region (compile_s)",
            "decode_tok_s": "Σ(new tokens − 1) / Σ decode time after the prefill (the first token is the "
                            "prefill's); wall_tok_s: Σ new tokens / Σ(prefill + decode)",
            "humaneval_message": eval_prompts.HUMANEVAL_INSTRUCTION + "{prompt}```",
        },
        "configs": [draft_info[c] for c in names],
        "warmup_compile_s": warm,
        "llama_cpp_f32": llama.info() if llama is not None else None,
        "skipped": {"llama_cpp_f32": lc_skip},
        "results": {},
        "prompts": records,
    }

    def write() -> None:
        res["results"] = {ds: summarize_dataset(records[ds], names, greedy) for ds in datasets if records[ds]}
        res["machine"]["load_average_1m"]["end"] = machine.load_average()
        write_json_atomic(Path(args.out), res)

    write()
    total = sum(len(ps) for ps in encoded.values())
    bar = tqdm(total=total, desc="prompts", unit="prompt", file=sys.stderr)
    i = 0
    for ds, ps in encoded.items():
        for pid, ids in ps:
            bar.set_description(f"{ds} {pid}")
            t_out = gen(ids, i, None)
            ref = list(t_out.token_ids) if greedy else None
            rec: dict[str, Any] = {"id": pid, "prompt_tokens": len(ids), "target": target_record(t_out),
                                   "configs": {}, "llama_cpp_f32": None}
            for c in configs:
                rec["configs"][c.name] = dovetail_record(gen(ids, i, c), ref)
            if llama is not None:
                try:
                    rec["llama_cpp_f32"] = llama.run(ids, len(t_out.token_ids), ref)
                except Exception as e:  # a peer crashing mid-run keeps what we have
                    lc_skip = res["skipped"]["llama_cpp_f32"] = f"failed: {type(e).__name__}: {e}"
                    _say(f"llama.cpp {lc_skip}")
                    llama.close()
                    llama = None
            rec["load_average_1m"] = machine.load_average()
            records[ds].append(rec)
            i += 1
            write()
            bar.update(1)
            bar.set_postfix_str(_postfix(res["results"][ds]))
    bar.close()
    if llama is not None:
        llama.close()
    res["complete"] = True
    write()
    from dovetail_jax.bench.plot_dovetail import plot

    out = Path(args.out)  # analysis/results/x.json -> analysis/figures/x.png; elsewhere: beside the JSON
    figs = plot(res, (out.parent.parent / "figures" if out.parent.name == "results" else out.parent)
                / out.with_suffix(".png").name)
    print(format_table(res) + f"\nwrote {args.out} and {figs[0]}")
    return res
