"""`dovetail bench dovetail`: Dovetail decoding on the paper's evaluation prompts (HumanEval, MT-bench).

The target is loaded twice: in the `[in, out]` layout a tree verifier wants (as `generate --mode dovetail`
uses) for every Dovetail configuration, and in the `[out, in]` layout for the target-only baseline; each draft
is loaded once. Every prompt
goes through the chat template and is decoded round-robin: target-only, each configuration, then llama.cpp on
the same weights as an F32 GGUF, so a slow spell of this shared machine hits all methods of that prompt alike.
One warm-up generation per method on the first prompt runs before anything is timed; a prompt of a new length
bucket compiles inside its own call, outside the timed region (`compile_s`). The machine's memory read bandwidth
is measured, untimed, before the first prompt and after the last (`machine.memory_read_gbs`: start, end), and
briefly after every `PROBE_EVERY`-th prompt (that prompt's `memory_read_gbs`).

Generations stop at EOS as `dovetail generate` does, so answers are natural; llama.cpp makes exactly as many
tokens as target-only did for that prompt. Tokens are counted alike for all methods: decode tok/s is
Σ(new tokens − 1) / Σ decode time (the first token comes from the prefill), wall tok/s is Σ new tokens /
Σ(prefill + decode). Every aggregate pools counts over prompts (Σcommitted / Σcycles, Σaccepted at depth d /
Σcycles reaching depth d, Σtokens / Σseconds), never a mean of per-prompt ratios.

The JSON is rewritten atomically after every prompt ("complete": false until the end) to `<out>.partial.json`,
so an interrupted run keeps what it measured; `--out` itself is written (atomically) only by a complete run, so
an interrupted or failed one leaves the old result byte-identical. This module is imported when the CLI parser
is built: JAX and the engines are imported only inside `run`.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dovetail_jax.argtypes import RANDOM_FLAGS, TREE_FLAGS, DraftFlags, flag
from dovetail_jax.bench import report
from dovetail_jax.bench.report import fmt, rate, ratio
from dovetail_jax.bench.results import partial_path, write_json_atomic
from dovetail_jax.config import DEFAULT_TREE, TREE_PRESETS, DraftConfig, SamplingConfig, TreeConfig
from dovetail_jax.errors import ConfigError, DovetailError, ModelFormatError
from dovetail_jax.io import eval_prompts
from dovetail_jax.stats import Acceptance

if TYPE_CHECKING:
    from dovetail_jax.devices import Placement

DEFAULT_OUT = Path("analysis/results/bench_dovetail.json")
DEFAULT_DATASETS = "humaneval,mtbench"
SCHEMA = "dovetail.bench.dovetail/1"
RESERVED_NAMES = ("target", "llama_cpp_f32")
CONFIG_KEYS = {"name", "draft", "tree", "draft_layers", "draft_fusion", "draft_vocab", "draft_head", "draft_weights",
               "widen_vocab"}
# --draft-head / "draft_head": the dtype of the draft's copy of the target's LM head (`api.load_draft(head_dtype=)`)
DRAFT_HEADS = {"f32": "float32", "bf16": "bfloat16", "int8": "int8"}
DRAFT_HEAD_HELP = ("dtype of the draft's copy of the target's LM head: bf16 rounds it once at load, halving the "
                   "bytes of the largest matrix each draft forward reads (faster drafting), int8 quantizes it per "
                   "row (a quarter of the bytes); it can change which tokens the draft proposes, never the "
                   "output, which the target verifies. Trained and random "
                   "drafts only (a standalone or 'self' draft keeps its own f32 head). Default: int8 for "
                   "trained and random drafts (same tau, less time, measured on HumanEval), f32 for "
                   "standalone and 'self' drafts")
# --draft-weights / "draft_weights": the draft's own matrices as stored, or int8 (`api.load_draft(weight_dtype=)`)
DRAFT_WEIGHTS = ("stored", "int8")
DRAFT_WEIGHTS_HELP = ("the draft's own matrices (fusion, decoder blocks): 'stored' as its checkpoint keeps them "
                      "(bf16 for the shipped drafts), 'int8' quantized per output channel at load, half the bytes "
                      "a draft step reads; like --draft-head it can change what the draft proposes, never the "
                      "output. Default: int8 for trained and random drafts (same tau, less time, measured on "
                      "HumanEval), stored for standalone and 'self' drafts")
TREE_KEYS = ("top_k", "depth", "total_tokens", "lookup")
RANDOM_KEYS = RANDOM_FLAGS  # the same names shape a random draft in a configs file and on the command line

_say = report.sayer("bench dovetail")


# --- configurations ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunConfig:
    """One Dovetail configuration: a draft (path, "self", "random" or None for the default) and a tree."""

    name: str
    draft: str | None
    tree: TreeConfig
    random_cfg: DraftConfig  # the random draft's shape ("random", or None when no draft is shipped)
    draft_head: str | None = None  # a key of DRAFT_HEADS; None: the API's default for the draft's kind
    draft_weights: str | None = None  # one of DRAFT_WEIGHTS; None: the API's default
    widen_vocab: int | None = None  # a trained draft's vocabulary widened to this many ids; None: as trained

    @property
    def draft_key(self) -> tuple[str | None, DraftConfig | None, str | None, str | None, int | None]:
        """Configurations with equal keys share one loaded draft (a bf16 head is a separately loaded draft)."""
        return (self.draft, (self.random_cfg if self.draft in (None, "random") else None), self.draft_head,
                self.draft_weights, self.widen_vocab)

    def to_dict(self) -> dict[str, Any]:
        r = self.random_cfg
        return {"name": self.name, "draft": self.draft, "draft_head": self.draft_head,
                "draft_weights": self.draft_weights, "widen_vocab": self.widen_vocab,
                "tree": {"top_k": self.tree.top_k, "depth": self.tree.depth, "total_tokens": self.tree.total_tokens,
                         "lookup": self.tree.lookup},
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
                              f"or give {{\"top_k\", \"depth\", \"total_tokens\", \"lookup\"}}")
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


def _draft_head(value: Any, draft: str | None, where: str) -> str | None:
    """A validated "draft_head" (None stays None: the API's default); "bf16" is refused for the "self" draft,
    whose head is its own."""
    if value is None:
        return None
    if not isinstance(value, str) or value not in DRAFT_HEADS:
        raise ConfigError(f"{where}: draft_head must be one of {', '.join(map(repr, DRAFT_HEADS))}, got {value!r}")
    if value != "f32" and draft == "self":
        raise ConfigError(f"{where}: draft_head {value!r} applies to drafts sharing the target's LM head; the "
                          "'self' draft keeps its own f32 head")
    return value


def _draft_weights(value: Any, where: str) -> str | None:
    """A validated "draft_weights" (None stays None: the API's default)."""
    if value is not None and (not isinstance(value, str) or value not in DRAFT_WEIGHTS):
        raise ConfigError(f"{where}: draft_weights must be one of {', '.join(map(repr, DRAFT_WEIGHTS))}, "
                          f"got {value!r}")
    return value


def _widen_vocab(value: Any, draft: str | None, where: str) -> int | None:
    """A validated "widen_vocab" (None stays None): a positive size, for a trained draft only."""
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{where}: widen_vocab must be a positive integer, got {value!r}")
    if draft in ("self", "random"):
        raise ConfigError(f"{where}: widen_vocab widens a trained draft's vocabulary, not the {draft!r} draft's")
    return value


def configs_from_flags(flags: DraftFlags, draft_head: str | None = None,
                       draft_weights: str | None = None) -> list[RunConfig]:
    """The single configuration that --draft / --tree / --tree-top-k / ... / --draft-head / --draft-weights
    describe (as `generate` reads them)."""
    random_opts = flags.given(RANDOM_FLAGS)
    draft = flags.draft
    if draft not in (None, "random") and random_opts:
        raise ConfigError(f"{flag(random_opts[0])} shapes a random draft; it cannot change --draft")
    if draft is None and random_opts:
        draft = "random"  # as in `generate`: shaping options ask for a random draft
    rcfg = flags.random_config()
    tree = flags.tree_config()
    head = _draft_head(draft_head, draft, "--draft-head")
    weights = _draft_weights(draft_weights, "--draft-weights")
    widen = _widen_vocab(flags.widen_vocab, draft, "--widen-vocab")
    name = f"{_draft_label(draft)}-{tree.top_k}-{tree.depth}-{tree.total_tokens}"
    name += f"-lookup{tree.lookup}" if tree.lookup else ""
    name += "" if head is None else f"-{head}"
    name += "" if weights is None else f"-w{weights}"
    name += "" if widen is None else f"-v{widen}"
    return [RunConfig(name, draft, tree, rcfg, head, weights, widen)]


def parse_configs(data: Any, where: str, default_tree: TreeConfig = DEFAULT_TREE) -> list[RunConfig]:
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
        head = _draft_head(c.get("draft_head"), draft, at)
        weights = _draft_weights(c.get("draft_weights"), at)
        widen = _widen_vocab(c.get("widen_vocab"), "random" if shaping else draft, at)
        out.append(RunConfig(name, draft, _tree_from_spec(c.get("tree"), at, default_tree), rcfg, head, weights,
                             widen))
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


def resolve_configs(configs_file: Path | None, flags: DraftFlags, draft_head: str | None = None,
                    draft_weights: str | None = None) -> list[RunConfig]:
    """The configurations of a run: those of `configs_file` (--configs), else the one the flags (and --draft-head,
    --draft-weights, None: not given) describe."""
    if configs_file is None:
        return configs_from_flags(flags, draft_head, draft_weights)
    single = flags.given(("draft", *TREE_FLAGS, *RANDOM_FLAGS, "widen_vocab"))
    if single:
        raise ConfigError(f"--configs replaces {flag(single[0])}; give one or the other")
    if draft_head is not None:
        raise ConfigError("--configs replaces --draft-head (use a configuration's \"draft_head\"); give one or the "
                          "other")
    if draft_weights is not None:
        raise ConfigError("--configs replaces --draft-weights (use a configuration's \"draft_weights\"); give one "
                          "or the other")
    return load_configs_file(configs_file)


@dataclass(frozen=True)
class DovetailBenchOptions:
    """What `dovetail bench dovetail` runs: datasets, configurations, sampling, and where it writes."""

    configs: tuple[RunConfig, ...]  # see `resolve_configs`
    model: str | None = None  # a GGUF file or HF folder; None: the embedded default
    tokenizer: str | None = None
    datasets: tuple[str, ...] = ("humaneval", "mtbench")  # see `parse_datasets`
    limit: int = 20  # prompts per dataset, the first N in file order
    max_new_tokens: int = 128  # per prompt at most; generation stops at EOS
    sampling: SamplingConfig = field(default_factory=SamplingConfig)  # prompt i samples with seed + i
    llama_cpp: bool | None = None  # None: on when llama_cpp is installed and the model is a GGUF file
    out: Path = DEFAULT_OUT
    placement: Placement | None = None  # where the targets and drafts run; None: `devices.placement()`


# --- pooling (pure functions over per-prompt records) ---------------------------------------------------------


def pool_acceptance(hists: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Pool acceptance histograms (index = tokens committed in a cycle − 1) of many runs: `stats.Acceptance`'s
    pooled record (tau = Σcommitted / Σcycles, the rate at each depth from pooled counts, None where no cycle
    reached that depth)."""
    return Acceptance.pool(Acceptance(tuple(int(c) for c in h)) for h in hists).to_dict()


def summarize_runs(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Pooled token and time totals of one method's runs (records with tokens, decode_steps, decode_s, prefill_s)."""
    tokens = sum(r["tokens"] for r in runs)
    steps = sum(r["decode_steps"] for r in runs)
    decode = sum(r["decode_s"] for r in runs)
    prefill = sum(r["prefill_s"] for r in runs)
    return {"n_prompts": len(runs), "tokens": tokens, "decode_steps": steps, "decode_s": decode, "prefill_s": prefill,
            "decode_tok_s": rate(steps, decode), "wall_tok_s": rate(tokens, prefill + decode),
            "compile_s": sum(r.get("compile_s", 0.0) for r in runs)}


def _lookup_summary(runs: Sequence[dict[str, Any]], cycles: int, tokens: int) -> dict[str, Any] | None:
    """How often a lookup chain was verified, and the tokens it added past the drafted tree (None: no lookup)."""
    looked = [r["lookup"] for r in runs if "lookup" in r]
    if not looked:
        return None
    lk_cycles, lk_tokens = sum(x["cycles"] for x in looked), sum(x["tokens"] for x in looked)
    return {"cycles": lk_cycles, "tokens": lk_tokens, "share_of_cycles": ratio(lk_cycles, cycles),
            "share_of_tokens": ratio(lk_tokens, tokens)}


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
    ties = sum(1 for r in runs if (r.get("divergence") or {}).get("tie")) if greedy else None
    return {
        "n_prompts": dt["n_prompts"],
        "tokens": dt["tokens"],
        "decode_steps": dt["decode_steps"],
        **acc,
        "decode_tok_s": dt["decode_tok_s"],
        "wall_tok_s": dt["wall_tok_s"],
        "target_decode_tok_s": tg["decode_tok_s"],
        "target_wall_tok_s": tg["wall_tok_s"],
        "speedup": ratio(dt["decode_tok_s"], tg["decode_tok_s"]),
        "speedup_wall": ratio(dt["wall_tok_s"], tg["wall_tok_s"]),
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
        "over_llama_cpp_f32": ratio(dt_on_lc and dt_on_lc["decode_tok_s"], lc and lc["decode_tok_s"]),
        "llama_cpp_n_prompts": len(with_lc),
        "greedy_identical": identical,
        # the differing prompts split: float ties of the target's own logits (bench/divergence.py), real mismatches
        "greedy_float_ties": ties,
        "greedy_mismatches": None if identical is None else len(runs) - identical - ties,
        "lookup": _lookup_summary(runs, cycles, dt["tokens"]),
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


def dovetail_record(out: Any, reference: list[int] | None,
                    divergence: dict[str, Any] | None = None) -> dict[str, Any]:
    """A Dovetail run's numbers; `identical` compares its tokens with target-only's (greedy only), `divergence`
    says where and how they differ (`divergence.first_divergence`), when they do."""
    a, x = out.stats.acceptance, out.stats.dovetail
    t = x.transfers
    return {
        **target_record(out),
        "cycles": a.cycles, "tau": a.tau or 0.0, "accept_hist": list(a.hist),
        "time_s": x.time_s.to_dict(), "prefill_time_s": x.prefill_time_s.to_dict(),
        "bytes_to_draft": t.bytes_to_draft, "bytes_to_target": t.bytes_to_target,
        "prefill_bytes_to_draft": t.prefill_bytes_to_draft,
        "transfers_to_draft": t.transfers_to_draft, "transfers_to_target": t.transfers_to_target,
        "identical": None if reference is None else list(out.token_ids) == list(reference),
        **({"lookup": {"cycles": x.lookup_cycles, "tokens": x.lookup_tokens}} if x.tree.lookup else {}),
        **({"divergence": divergence} if divergence is not None else {}),
    }


def llama_info(engine: Any) -> dict[str, Any]:
    return {"engine": engine.version, "gguf_f32": str(engine.f32), "convert_s": engine.convert_s,
            "load_s": engine.load_s, "threads": engine.threads,
            "tokens": "as many as target-only made for the prompt (EOS not checked)", "greedy": True}


def llama_record(engine: Any, prompt_ids: list[int], n: int, reference: list[int] | None) -> dict[str, Any]:
    """llama.cpp's run of one prompt (a `peers.LlamaCppEngine`), counted as our own decoders count."""
    g = engine.generate(prompt_ids, n)
    return {"tokens": len(g.tokens), "decode_steps": len(g.tokens) - 1, "decode_s": g.decode_s,
            "prefill_s": g.prefill_s, "tok_s": rate(len(g.tokens) - 1, g.decode_s),
            "tokens_equal_target": None if reference is None else g.tokens == list(reference)}


# --- the run --------------------------------------------------------------------------------------------------


def _llama_plan(wanted: bool | None, model_path: Path) -> str | None:
    """None when llama.cpp runs, else why not; an explicit --llama-cpp that cannot run is an error."""
    reason = None
    if importlib.util.find_spec("llama_cpp") is None:
        reason = "llama_cpp is not installed (pip install -e '.[bench]')"
    elif not model_path.is_file():
        reason = "the model is not a GGUF file (llama.cpp needs one)"
    if wanted is False:
        return "--no-llama-cpp"
    if reason and wanted:
        raise ConfigError(f"--llama-cpp: {reason}")
    return reason


def _load_draft(api: Any, target: Any, c: RunConfig, seed: int) -> Any:
    try:
        head_dtype = DRAFT_HEADS[c.draft_head] if c.draft_head else None
        if c.draft == "random":
            return api.random_draft(target, c.random_cfg, seed=seed, head_dtype=head_dtype,
                                    weight_dtype=c.draft_weights)
        return api.load_draft(target, c.draft, fallback_random=c.random_cfg, seed=seed, head_dtype=head_dtype,
                              weight_dtype=c.draft_weights, vocab_size=c.widen_vocab)
    except DovetailError as e:
        raise type(e)(f"configuration {c.name!r}: draft {c.draft!r}: {e}") from None
    except Exception as e:  # any failure to load a user-given draft is bad input, not a crash
        raise ModelFormatError(f"configuration {c.name!r}: cannot load draft {c.draft!r} "
                               f"({type(e).__name__}: {e})") from None


def format_table(res: dict[str, Any]) -> str:
    rows = []
    head = (f"{'config':<24}{'n':>4}{'tokens':>8}{'tau':>6}{'tok/s':>8}{'target':>8}{'speedup':>8}{'wall x':>7}"
            f"{'llama.cpp':>10}{'/llama':>7}{'identical':>10}")
    for ds, r in res["results"].items():
        rows.append(f"{ds}: {r['n_prompts']} prompts; target-only {fmt(r['target']['decode_tok_s'], '.1f')} tok/s"
                    + (f", llama.cpp F32 {fmt(r['llama_cpp_f32']['decode_tok_s'], '.1f')} tok/s"
                       if r["llama_cpp_f32"] else ""))
        rows.append(head)
        for name, c in r["configs"].items():
            ident = "-" if c["greedy_identical"] is None else f"{c['greedy_identical']}/{c['n_prompts']}"
            if c.get("greedy_float_ties"):
                ident += f" +{c['greedy_float_ties']} tie"
            rows.append(f"{name[:23]:<24}{c['n_prompts']:>4}{c['tokens']:>8}{fmt(c['tau'], '.2f'):>6}"
                        f"{fmt(c['decode_tok_s'], '.1f'):>8}{fmt(c['target_decode_tok_s'], '.1f'):>8}"
                        f"{fmt(c['speedup'], '.2f'):>8}{fmt(c['speedup_wall'], '.2f'):>7}"
                        f"{fmt(c['llama_cpp_f32_tok_s'], '.1f'):>10}{fmt(c['over_llama_cpp_f32'], '.2f'):>7}"
                        f"{ident:>10}")
            pc = c["per_cycle_ms"]
            if pc:
                rows.append(f"{'':<4}per cycle: verify {pc['verify']:.1f} ms, draft {pc['draft']:.1f}, "
                            f"transfer {pc['transfer']:.2f}, host {pc['host']:.2f}; "
                            f"depth rates {', '.join(fmt(x, '.2f') for x in c['depth_accept_rates'])}")
    return "\n".join(rows)


def _postfix(summary: dict[str, Any]) -> str:
    parts = []
    for name, c in summary["configs"].items():
        parts.append(f"{name[:16]} tau {fmt(c['tau'], '.2f')} x{fmt(c['speedup'], '.2f')}")
    return "; ".join(parts)


def _encode(api: Any, target: Any, prompts: dict[str, list[tuple[str, str]]], configs: Sequence[RunConfig],
            n: int) -> dict[str, list[tuple[str, list[int]]]]:
    """Chat-templated prompt ids per dataset; refuses, before any timing, what would overflow the context later."""
    from dovetail_jax.plan import plan_dovetail, plan_sizes

    encoded = {ds: [(pid, api.encode_prompt(target, text, chat=True)) for pid, text in ps]
               for ds, ps in prompts.items()}
    for ds, ps in encoded.items():
        for pid, ids in ps:
            plan_sizes(target.cfg, len(ids), n)
            for c in configs:
                try:
                    plan_dovetail(target.cfg, c.tree, len(ids), n)
                except ConfigError as e:
                    raise ConfigError(f"{ds} prompt {pid}, configuration {c.name!r}: {e}") from None
    return encoded


def _load_drafts(api: Any, target: Any, configs: Sequence[RunConfig],
                 seed: int) -> tuple[dict[tuple, Any], dict[str, dict[str, Any]]]:
    """(draft per draft key, each configuration's record); configurations with equal keys share one draft."""
    from dovetail_jax.decode import dovetail as dovetail_lib

    drafts: dict[tuple, Any] = {}
    info: dict[str, dict[str, Any]] = {}
    for c in configs:
        t0 = time.perf_counter()
        if c.draft_key not in drafts:
            _say(f"loading draft {_draft_label(c.draft)} for {c.name}")
            drafts[c.draft_key] = _load_draft(api, target, c, seed)
        d = drafts[c.draft_key]
        try:
            dovetail_lib.check_draft(target.cfg, d, c.tree)
        except ConfigError as e:
            raise ConfigError(f"configuration {c.name!r}: {e}") from None
        info[c.name] = {**c.to_dict(), "draft_source": d.source, "draft_layers": d.cfg.num_layers,
                        "draft_fusion": d.cfg.fusion, "draft_vocab": int(d.shared.head.shape[0]),
                        "draft_feature_layers": list(d.cfg.feature_layers),
                        "draft_head_dtype": str(d.shared.head.dtype),
                        "draft_weight_dtype": str(d.params.layers[0].wqkv.dtype),
                        "load_s": time.perf_counter() - t0}
        if d.is_random:
            _say(f"note: {c.name} uses an untrained ({d.source}) draft: lossless, but few drafts are accepted")
    return drafts, info


@dataclass
class _Methods:
    """Everything one benchmark run times: target-only, each configuration, llama.cpp (while it works)."""

    api: Any
    target: Any  # the [in, out] layout a tree verifier wants, serving every configuration
    baseline: Any  # target-only decodes with its own fastest layout, [out, in] (single-token steps)
    configs: Sequence[RunConfig]
    drafts: dict[tuple, Any]
    sampling: SamplingConfig
    n: int
    llama: Any | None = None  # a peers.LlamaCppEngine
    lc_skip: str | None = None  # why llama.cpp does not run (None: it does)

    def gen(self, ids: list[int], i: int, c: RunConfig | None) -> Any:
        """Prompt i's generation by target-only (`c` None) or a configuration; prompt i samples with seed + i."""
        s = self.sampling
        sampling = SamplingConfig(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, seed=s.seed + i)
        if c is None:
            return self.api.generate(self.baseline, ids, max_new_tokens=self.n, sampling=sampling)
        return self.api.generate(self.target, ids, max_new_tokens=self.n, sampling=sampling,
                                 draft=self.drafts[c.draft_key], tree=c.tree)

    def start_llama(self, model_path: Path, n_ctx: int) -> None:
        from dovetail_jax.bench.peers import LlamaCppEngine

        _say("llama.cpp: loading the F32 GGUF (converted once, then cached)")
        try:
            self.llama = LlamaCppEngine(model_path, n_ctx=n_ctx)
        except Exception as e:  # the peer's failure must not lose our own measurement
            self.lc_skip = f"failed: {type(e).__name__}: {e}"
            _say(f"llama.cpp {self.lc_skip}")

    def run_llama(self, ids: list[int], n: int, reference: list[int] | None) -> dict[str, Any] | None:
        """llama.cpp's record of one prompt; a peer crashing mid-run is recorded and dropped, keeping the rest."""
        if self.llama is None:
            return None
        try:
            return llama_record(self.llama, ids, n, reference)
        except Exception as e:
            self.lc_skip = f"failed: {type(e).__name__}: {e}"
            _say(f"llama.cpp {self.lc_skip}")
            self.llama.close()
            self.llama = None
            return None

    def warm_up(self, ids: list[int]) -> dict[str, float]:
        """One untimed generation per method on the first prompt (compiles, first executions, allocations)."""
        _say("warming up (one untimed generation per method on the first prompt)")
        warm = {"target": self.gen(ids, 0, None).stats.compile_s}
        for c in self.configs:
            warm[c.name] = self.gen(ids, 0, c).stats.compile_s
        self.run_llama(ids, min(8, self.n), None)
        return warm

    def dovetail(self, pid: str, ids: list[int], i: int, c: RunConfig, ref: list[int] | None) -> dict[str, Any]:
        """Configuration c's record of prompt i; a greedy output that differs from target-only's gets its
        divergence classified (one untimed target forward)."""
        from dovetail_jax.bench.divergence import first_divergence

        out = self.gen(ids, i, c)
        div = None
        if ref is not None and list(out.token_ids) != ref:
            div = first_divergence(self.baseline.params, self.baseline.cfg, ids, ref, list(out.token_ids))
            _say(f"{pid}, {c.name}: differs from target-only at token {div['index']} "
                 + ("(a float tie of the target's logits)" if div["tie"] else "(NOT a float tie: a mismatch)"))
        return dovetail_record(out, ref, div)

    def measure(self, pid: str, ids: list[int], i: int) -> dict[str, Any]:
        """Prompt i round-robin: target-only, each configuration, then llama.cpp for as many tokens."""
        t_out = self.gen(ids, i, None)
        ref = list(t_out.token_ids) if self.sampling.greedy else None
        return {"id": pid, "prompt_tokens": len(ids), "target": target_record(t_out),
                "configs": {c.name: self.dovetail(pid, ids, i, c, ref) for c in self.configs},
                "llama_cpp_f32": self.run_llama(ids, len(t_out.token_ids), ref)}


def _settings(opts: DovetailBenchOptions) -> dict[str, Any]:
    s = opts.sampling
    return {
        "datasets": list(opts.datasets), "limit": opts.limit, "max_new_tokens": opts.max_new_tokens, "chat": True,
        "ignore_eos": False,
        "sampling": {"temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k, "seed": s.seed,
                     "seed_per_prompt": "seed + prompt index"},
        "greedy": s.greedy,
        "order": "per prompt, round-robin: target-only, each configuration, llama.cpp",
        "warmup": "one untimed generation per method on the first prompt; new length buckets compile "
                  "outside the timed region (compile_s)",
        "decode_tok_s": "Σ(new tokens − 1) / Σ decode time after the prefill (the first token is the "
                        "prefill's); wall_tok_s: Σ new tokens / Σ(prefill + decode)",
        "humaneval_message": eval_prompts.HUMANEVAL_INSTRUCTION + "{prompt}```",
    }


def _model_record(target: Any, model_path: Path) -> dict[str, Any]:
    return {"source": target.source, "path": str(model_path), "name": target.cfg.name,
            "num_params": target.cfg.num_params, "layout": f"{target.params.layout} (dovetail), out_in (target-only)",
            "load_s": target.load_s, "eos_ids": list(target.eos_ids),
            "chat_format": "the model's template" if target.tokenizer.chat_template is not None else "ChatML (the "
                           "model has no chat template)"}


def _prepare(opts: DovetailBenchOptions) -> tuple[_Methods, dict[str, list[tuple[str, list[int]]]], dict[str, Any]]:
    """Load the targets, the drafts and llama.cpp, encode and check the prompts, warm every method up; returns
    the methods, the encoded prompts and the result's header."""
    from dovetail_jax import api, machine
    from dovetail_jax.io.registry import default_model_path
    from dovetail_jax.model.params import fast_layout

    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    load_start = machine.load_average()
    prompts = {ds: eval_prompts.load_dataset(ds)[: opts.limit] for ds in opts.datasets}
    model_path = Path(opts.model).expanduser() if opts.model is not None else default_model_path()
    lc_skip = _llama_plan(opts.llama_cpp, model_path)
    n = opts.max_new_tokens
    layout = fast_layout(2)
    _say(f"loading the target ({opts.model or 'default'}, {layout} layout for verification)")
    target = api.load_target(opts.model, layout=layout, tokenizer=opts.tokenizer, placement=opts.placement)
    baseline = api.load_target(opts.model, layout="out_in", tokenizer=opts.tokenizer, placement=target.placement)
    if target.tokenizer.chat_template is None:  # as `generate --chat` says: the prompts are not the model's format
        print("dovetail: note: the model has no chat template; the benchmark's chat prompts use the ChatML format "
              "(<|im_start|>role ... <|im_end|>)", file=sys.stderr)
    encoded = _encode(api, target, prompts, opts.configs, n)
    drafts, draft_info = _load_drafts(api, target, opts.configs, opts.sampling.seed)
    m = _Methods(api, target, baseline, opts.configs, drafts, opts.sampling, n, lc_skip=lc_skip)
    if lc_skip is None:
        longest = max(len(ids) for ps in encoded.values() for _, ids in ps)
        m.start_llama(model_path, n_ctx=max(512, longest + n + 16))
    warm = m.warm_up(next(iter(encoded.values()))[0][1])
    header = {
        "schema": SCHEMA, "complete": False, "timestamp": started, "command": report.command_line(),
        "machine": {**machine.machine_info(), "load_average_1m": {"start": load_start, "end": None}},
        "model": _model_record(target, model_path),
        "settings": _settings(opts),
        "configs": [draft_info[c.name] for c in opts.configs],
        "warmup_compile_s": warm,
        "llama_cpp_f32": llama_info(m.llama) if m.llama is not None else None,
        "skipped": {"llama_cpp_f32": m.lc_skip},
    }
    return m, encoded, header


def _finish(res: dict[str, Any], out: Path) -> None:
    """The figure beside the results (analysis/results/x.json -> analysis/figures/x.png) and the table."""
    from dovetail_jax.bench.plot_dovetail import plot

    figs = plot(res, (out.parent.parent / "figures" if out.parent.name == "results" else out.parent)
                / out.with_suffix(".png").name)
    print(format_table(res) + f"\nwrote {out} and {figs[0]}")


PROBE_EVERY = 8  # prompts between the short read-bandwidth probes taken during the run (untimed)


def _read_gbs(machine: Any, quiet: bool = False, **kw: Any) -> float | None:
    """The machine's read bandwidth in GB/s (`machine.memory_read_bandwidth_gbs`, ~1 s, untimed); None if the
    probe fails: a failed probe must not lose the benchmark's measurements."""
    if not quiet:
        _say("measuring the machine's memory read bandwidth (untimed)")
    try:
        return machine.memory_read_bandwidth_gbs(**kw)
    except (RuntimeError, MemoryError) as e:
        _say(f"memory read bandwidth not measured ({type(e).__name__}: {e})")
        return None


def run(opts: DovetailBenchOptions) -> dict[str, Any]:
    """Run the benchmark, rewriting `<out>.partial.json` after every prompt and writing `opts.out` (atomically)
    only when every prompt is done, so an interrupted or failed run leaves the old result intact."""
    from tqdm import tqdm

    from dovetail_jax import machine

    m, encoded, res = _prepare(opts)
    # the machine's read bandwidth (decode is bound by it; it swings ~2x between hours here) brackets the timed
    # prompts, so a simulator can predict this run on the hardware it actually had (`simulator.validate engines`)
    res["machine"]["memory_read_gbs"] = {"start": _read_gbs(machine), "end": None}
    names = [c.name for c in opts.configs]
    greedy = opts.sampling.greedy
    records: dict[str, list[dict[str, Any]]] = {ds: [] for ds in opts.datasets}
    res |= {"results": {}, "prompts": records}

    def write(final: bool = False) -> None:
        res["results"] = {ds: summarize_dataset(records[ds], names, greedy) for ds in opts.datasets if records[ds]}
        res["skipped"]["llama_cpp_f32"] = m.lc_skip
        res["machine"]["load_average_1m"]["end"] = machine.load_average()
        write_json_atomic(Path(opts.out) if final else partial_path(Path(opts.out)), res)
        if final:
            partial_path(Path(opts.out)).unlink(missing_ok=True)

    write()
    bar = tqdm(total=sum(len(ps) for ps in encoded.values()), desc="prompts", unit="prompt", file=sys.stderr)
    i = 0
    for ds, ps in encoded.items():
        for pid, ids in ps:
            bar.set_description(f"{ds} {pid}")
            rec = m.measure(pid, ids, i)
            rec["load_average_1m"] = machine.load_average()
            if i % PROBE_EVERY == 0:  # the bandwidth of this stretch of the run: the start/end probes alone miss
                # the slow hours' dips (a best-of-5 read at either end said 27.7 GB/s while decode ran at 60%)
                rec["memory_read_gbs"] = _read_gbs(machine, quiet=True, size_mib=512, repeats=3)
            records[ds].append(rec)
            i += 1
            write()
            bar.update(1)
            bar.set_postfix_str(_postfix(res["results"][ds]))
    bar.close()
    if m.llama is not None:
        m.llama.close()
    res["machine"]["memory_read_gbs"]["end"] = _read_gbs(machine)
    res["complete"] = True
    write(final=True)
    _finish(res, Path(opts.out))
    return res
