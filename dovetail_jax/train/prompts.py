"""Training prompts that exist on every fresh machine, with no model hub and no evaluation set.

Two sources, both deterministic for a given Python installation:

- **Code**: public functions of the Python standard library with a docstring, read with `ast` (nothing is
  imported or run), turned into "complete this stub" and "write a function that ..." requests. This is
  HumanEval's style of request without HumanEval's problems.
- **Chat**: requests built from templates over hand-written topic lists, one family per kind of request an
  instruct model gets (explanations, writing, advice, comparisons, lists, arithmetic word problems,
  rewriting and extraction). The answers are the target's own (self-distillation), so only the *prompts*
  need to be plausible.

The evaluation prompts (HumanEval, MT-bench) are never used; `tests/test_train_data.py` checks that no
training prompt contains one or is contained in one.
"""

from __future__ import annotations

import ast
import random
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CODE_INSTRUCTION = "Complete the code I provided."

# Standard-library folders whose code is private, generated, platform-specific or test code.
_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "tkinter", "turtledemo", "ensurepip", "site-packages",
              "__pycache__", "pydoc_data", "encodings", "config-3", "distutils", "msilib"}


@dataclass(frozen=True)
class Prompt:
    source: str  # "code" or "chat/<family>"
    text: str  # the user message (the chat template is applied later)


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if any(part in _SKIP_DIRS or part.startswith(("config-", "_")) for part in rel[:-1]):
            continue
        if rel[-1].startswith("_"):
            continue
        files.append(path)
    return files


def _first_paragraph(doc: str) -> str:
    para = doc.strip().split("\n\n")[0]
    return " ".join(line.strip() for line in para.splitlines()).strip()


def _stub(fn: ast.FunctionDef, doc: str) -> str:
    args = ast.unparse(fn.args)
    ret = f" -> {ast.unparse(fn.returns)}" if fn.returns is not None else ""
    body = "\n".join(("    " + line.strip()) if line.strip() else "" for line in doc.strip().splitlines())
    return f'def {fn.name}({args}){ret}:\n    """{body.strip()}\n    """\n'


def stdlib_functions(max_doc_chars: int = 600) -> Iterator[tuple[str, str, str]]:
    """(module, stub, one-line summary) for every public top-level stdlib function with a usable docstring."""
    for path in _stdlib_files():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            if not doc or len(doc) > max_doc_chars or len(doc) < 20:
                continue
            summary = _first_paragraph(doc)
            if not summary or len(summary) > 300:
                continue
            yield path.stem, _stub(node, doc), summary


def code_prompts() -> list[Prompt]:
    out = []
    for i, (module, stub, summary) in enumerate(stdlib_functions()):
        if i % 2 == 0:
            text = f"{CODE_INSTRUCTION}\n```python\n{stub}```"
        else:
            s = summary[0].lower() + summary[1:]
            text = f"Write a Python function for this task (as in the `{module}` module): {s}"
        out.append(Prompt("code", text))
    return out


_TOPICS = [
    "photosynthesis", "the water cycle", "black holes", "climate change", "the French Revolution",
    "the Roman Empire", "machine learning", "blockchain", "vaccines", "the immune system", "plate tectonics",
    "renewable energy", "the stock market", "inflation", "democracy", "the Renaissance", "quantum computing",
    "the human brain", "volcanoes", "ocean currents", "electric cars", "the internet", "social media",
    "meditation", "time management", "healthy eating", "regular exercise", "learning a new language",
    "public speaking", "remote work", "recycling", "urban gardening", "space exploration", "the Moon landing",
    "ancient Egypt", "the Industrial Revolution", "World War I", "the printing press", "antibiotics",
    "DNA", "evolution", "gravity", "electricity", "magnetism", "the speed of light", "earthquakes",
    "rainforests", "coral reefs", "bees and pollination", "artificial intelligence ethics", "cybersecurity",
    "cloud computing", "open-source software", "databases", "operating systems", "compilers",
    "sorting algorithms", "recursion", "version control with git", "unit testing", "functional programming",
    "object-oriented programming", "the Python language", "JavaScript", "web browsers", "encryption",
    "supply and demand", "budgeting", "saving for retirement", "starting a small business", "marketing",
    "leadership", "teamwork", "negotiation", "job interviews", "writing a resume", "sleep", "stress",
    "friendship", "parenting", "pets", "coffee", "tea", "chess", "football", "the Olympic Games", "jazz",
    "classical music", "impressionist painting", "poetry", "Shakespeare", "mythology", "philosophy",
    "ethics", "the scientific method", "statistics", "probability", "prime numbers", "geometry",
    "the Pythagorean theorem", "calculus", "the periodic table", "chemical reactions", "nuclear energy",
    "solar panels", "wind turbines", "batteries", "3D printing", "robots", "self-driving cars", "drones",
    "smartphones", "video games", "film making", "photography", "travel in Japan", "Italian cooking",
    "baking bread", "camping", "mountain climbing", "marathon training", "yoga", "the ocean",
    "deserts", "the Arctic", "migration of birds", "dinosaurs", "the solar system", "Mars", "comets",
]
_PEOPLE = ["a teacher", "a software engineer", "a doctor", "a chef", "a historian", "a travel guide",
           "a personal trainer", "a detective", "a pirate captain", "a museum curator", "a scientist",
           "a librarian", "a startup founder", "a gardener", "an astronaut", "a journalist"]
_CHAT_TEMPLATES = {
    "explain": ["Explain {t} in simple terms.", "What is {t}?", "How does {t} work?",
                "Why is {t} important?", "Give me a short overview of {t}.",
                "Explain {t} to a ten-year-old.", "What are common misconceptions about {t}?"],
    "list": ["List five interesting facts about {t}.", "What are the pros and cons of {t}?",
             "Give me three tips related to {t}.", "What are the main challenges of {t}?",
             "Name some key terms someone should know about {t}."],
    "writing": ["Write a short poem about {t}.", "Write a short story that involves {t}.",
                "Write a blog post introduction about {t}.", "Write a tweet about {t}.",
                "Write a short persuasive paragraph about {t}.", "Write a haiku about {t}.",
                "Write an email to a friend recommending they learn about {t}."],
    "roleplay": ["Imagine you are {p}. Describe {t} to a curious visitor.",
                 "Act as {p} and give advice about {t}.",
                 "You are {p}. Answer in character: what do you think about {t}?"],
    "compare": ["Compare {t} and {u}.", "What do {t} and {u} have in common?",
                "Which is more interesting to study, {t} or {u}? Explain."],
    "howto": ["How can I get started with {t}?", "What is the best way to learn about {t}?",
              "Give me a step-by-step plan to understand {t}."],
}
_CODE_TASKS = [
    "reverses a string", "checks whether a string is a palindrome", "counts the vowels in a string",
    "returns the n-th Fibonacci number", "computes the factorial of a number", "finds the maximum of a list",
    "removes duplicates from a list while keeping the order", "merges two sorted lists",
    "checks whether a number is prime", "returns the greatest common divisor of two numbers",
    "flattens a nested list", "counts word frequencies in a text", "converts Celsius to Fahrenheit",
    "sorts a list of dictionaries by a key", "finds the second largest number in a list",
    "checks whether two strings are anagrams", "returns the sum of the digits of an integer",
    "implements binary search", "transposes a matrix", "validates an email address with a regular expression",
    "reads a CSV file and returns the rows as dictionaries", "computes the mean and median of a list",
    "capitalizes the first letter of every word", "rotates a list by k positions",
    "finds all pairs in a list that sum to a target", "implements a stack class",
    "implements a queue using two stacks", "computes the power set of a list", "converts a decimal to binary",
    "counts the number of lines in a file", "returns the longest word in a sentence",
    "chunks a list into pieces of size n", "computes the dot product of two vectors",
    "checks whether parentheses in a string are balanced", "returns the intersection of two lists",
]
_CODE_TEMPLATES = ["Write a Python function that {c}.", "Write a Python function that {c}, with a docstring.",
                   "How do I write a function in Python that {c}?",
                   "Write a Python function that {c}, and explain how it works."]
_NAMES = ["Alice", "Ben", "Carla", "David", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas"]
_ITEMS = ["apples", "books", "pencils", "marbles", "cookies", "stamps", "tickets", "shells"]


def _math_prompts(rng: random.Random, n: int) -> list[Prompt]:
    out = []
    for _ in range(n):
        a, b, c = rng.randint(3, 60), rng.randint(2, 25), rng.randint(2, 9)
        who, other = rng.sample(_NAMES, 2)
        item = rng.choice(_ITEMS)
        kind = rng.randrange(4)
        if kind == 0:
            text = f"{who} has {a} {item} and gives {b} to {other}. Then {who} buys {c} times as many as are left. " \
                   f"How many {item} does {who} have now?"
        elif kind == 1:
            text = f"A train travels {a * 10} km in {c} hours. What is its average speed? Show your work."
        elif kind == 2:
            text = f"Solve for x: {c}x + {b} = {a + b * c}."
        else:
            text = f"{who} reads {b} pages a day. How many days will it take to finish a book of {a * 10} pages?"
        out.append(Prompt("chat/math", text))
    return out


def chat_prompts(seed: int = 0) -> list[Prompt]:
    rng = random.Random(seed)
    out = []
    for family, templates in _CHAT_TEMPLATES.items():
        for t in _TOPICS:
            tpl = rng.choice(templates)
            u = rng.choice([x for x in _TOPICS if x != t])
            out.append(Prompt(f"chat/{family}", tpl.format(t=t, u=u, p=rng.choice(_PEOPLE))))
    for c in _CODE_TASKS:
        for tpl in _CODE_TEMPLATES:
            out.append(Prompt("chat/code", tpl.format(c=c)))
    out.extend(_math_prompts(rng, 150))
    return out


def training_prompts(seed: int = 0) -> list[Prompt]:
    """All training prompts, deterministically shuffled (so any prefix mixes code and chat)."""
    prompts = code_prompts() + chat_prompts(seed)
    seen, unique = set(), []
    for p in prompts:
        if p.text not in seen:
            seen.add(p.text)
            unique.append(p)
    random.Random(seed).shuffle(unique)
    return unique
