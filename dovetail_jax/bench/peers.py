"""The peer engines the benches time against ours: Hugging Face transformers (f32) and llama.cpp (F32 GGUF).

Each gets the same prompt token ids, greedy decoding and the same number of new tokens as our target, and
each is timed so that only decode steps count. llama.cpp runs the *same weights* written back as an F32 GGUF
(one `LlamaCppEngine` for both benches), so the comparison is f32 against f32 and not against its faster
quantised kernels. Neither torch, transformers nor llama_cpp is imported before its engine runs.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGUFValueType
from gguf.quants import dequantize

from dovetail_jax import paths
from dovetail_jax.errors import ModelFormatError

log = logging.getLogger(__name__)

_SKIP_KEYS = ("GGUF.",)  # the reader's synthetic fields (version, counts): the writer makes its own


def _raw_value(field: Any) -> tuple[Any, GGUFValueType, GGUFValueType | None]:
    """(value, type, array item type) of a reader field; strings stay bytes so non-UTF-8 survives."""
    main = GGUFValueType(int(field.types[0]))
    if main == GGUFValueType.ARRAY:
        if len(field.types) > 2:
            raise ModelFormatError(f"metadata '{field.name}': nested arrays are not supported")
        sub = GGUFValueType(int(field.types[-1]))
        if sub == GGUFValueType.STRING:
            return [bytes(field.parts[i]) for i in field.data], main, sub
        return field.contents(), main, sub
    if main == GGUFValueType.STRING:
        return bytes(field.parts[-1]), main, None
    return field.contents(), main, None


def write_f32_gguf(src: str | Path, dst: str | Path) -> None:
    """Write `src` again with every tensor dequantised to F32 and every metadata field copied verbatim.

    Tensors keep GGUF's own row order (llama.cpp reads its own layout, so q/k stay permuted); they are
    dequantised one at a time so memory stays at one tensor, not the whole model.
    """
    try:
        reader = gguf.GGUFReader(src)
    except Exception as e:  # the reader raises assorted errors on a damaged file
        raise ModelFormatError(f"{src}: cannot read GGUF file ({type(e).__name__}: {e})") from None
    arch_field = reader.fields.get("general.architecture")
    if arch_field is None:
        raise ModelFormatError(f"{src}: no 'general.architecture' metadata")
    writer = gguf.GGUFWriter(dst, arch=str(arch_field.contents()))
    for key, field in reader.fields.items():
        if key.startswith(_SKIP_KEYS) or key == "general.architecture":
            continue
        value, vtype, sub = _raw_value(field)
        if vtype == GGUFValueType.ARRAY and len(value) == 0:
            log.warning("%s: metadata '%s' is an empty array, which GGUFWriter cannot write; dropped", src, key)
            continue
        writer.add_key_value(key, value, vtype, sub_type=sub)
        if key == "general.alignment":
            writer.data_alignment = int(value)
    shapes = []
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # numpy order: slowest dimension first
        shapes.append(shape)
        writer.add_tensor_info(t.name, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t, shape in zip(reader.tensors, shapes, strict=True):
            w = np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
            writer.write_tensor_data(w)
    finally:
        writer.close()


def cached_f32_gguf(src: str | Path) -> tuple[Path, float]:
    """(path of the F32 copy of `src`, seconds spent converting; 0 on a cache hit).

    Keyed by the source's size and mtime, written atomically; older copies of the same stem are removed
    (each is about 4 bytes per parameter).
    """
    src = Path(src)
    st = src.stat()
    folder = paths.f32_gguf_cache()  # never inside the repository
    dst = folder / f"{src.stem}.{st.st_size}-{st.st_mtime_ns}.F32.gguf"
    if dst.is_file():
        return dst, 0.0
    folder.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f"{dst.name}.{os.getpid()}.tmp")
    t0 = time.perf_counter()
    try:
        write_f32_gguf(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    for old in folder.glob(f"{src.stem}.*.F32.gguf"):
        if old != dst:
            old.unlink(missing_ok=True)
    return dst, time.perf_counter() - t0


class HFEngine:
    """HF transformers f32 greedy `generate`; decode tok/s = (N-1) / (t(generate N) - t(generate 1)).

    Subtracting a 1-token generate removes prefill and generate()'s fixed setup, leaving N-1 decode steps.
    Each of the two times is the best over rounds.
    """

    name = "hf_transformers"

    def __init__(self, model: Path, prompt_ids: Sequence[int], max_new_tokens: int) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        import transformers
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.threads = os.cpu_count() or 1
        torch.set_num_threads(self.threads)
        t0 = time.perf_counter()
        if model.is_dir():
            m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        else:
            m = AutoModelForCausalLM.from_pretrained(model.parent, gguf_file=model.name, dtype=torch.float32)
        self.model = m.eval()
        self.load_s = time.perf_counter() - t0
        self.version = f"transformers {transformers.__version__} (torch {torch.__version__}), float32"
        self.ids = torch.tensor([list(prompt_ids)], dtype=torch.long)
        self.n = max_new_tokens
        gc_ = m.generation_config
        self.pad = gc_.pad_token_id if gc_.pad_token_id is not None else gc_.eos_token_id
        self.t_n: list[float] = []
        self.t_1: list[float] = []
        self.tokens: list[int] | None = None
        self._gen(2)  # warm-up: first-call allocations and lazy initialisation

    def _gen(self, n: int) -> tuple[float, list[int]]:
        t = time.perf_counter()
        with self.torch.inference_mode():
            out = self.model.generate(self.ids, attention_mask=self.torch.ones_like(self.ids), max_new_tokens=n,
                                      min_new_tokens=n, do_sample=False, temperature=None, top_p=None, top_k=None,
                                      pad_token_id=self.pad)
        return time.perf_counter() - t, out[0, self.ids.shape[1]:].tolist()

    def run_once(self) -> None:
        dt, toks = self._gen(self.n)
        self.t_n.append(dt)
        self.tokens = self.tokens or toks
        self.t_1.append(self._gen(1)[0])

    def result(self) -> dict[str, Any]:
        best_n, best_1 = min(self.t_n), min(self.t_1)
        n = self.n
        decode = (n - 1) / (best_n - best_1) if n > 1 and best_n > best_1 else None
        return {
            "engine": self.version,
            "threads": self.threads,
            "decode_tok_s": decode,
            "decode_method": "(N-1) / (best t(generate N) - best t(generate 1))",
            "runs_decode_tok_s": [(n - 1) / (a - b) for a, b in zip(self.t_n, self.t_1, strict=True) if a > b],
            "total_tok_s": n / best_n,
            "prefill_s": best_1,
            "load_s": self.load_s,
            "runs_generate_n_s": self.t_n,
            "runs_generate_1_s": self.t_1,
            "token_ids": self.tokens,
        }

    def close(self) -> None:
        del self.model


@dataclass
class TimedTokens:
    """One greedy llama.cpp generation: its tokens, when each arrived, and llama's own eval counters."""

    start: float
    stamps: list[float]
    tokens: list[int]
    eval_ms: float
    n_eval: int

    @property
    def prefill_s(self) -> float:
        return self.stamps[0] - self.start

    @property
    def decode_s(self) -> float:
        """First to last generated token: n − 1 decode steps, as our own decoders count them."""
        return self.stamps[-1] - self.stamps[0]

    @property
    def total_s(self) -> float:
        return self.stamps[-1] - self.start


class LlamaCppEngine:
    """llama.cpp greedy decoding on the F32 copy of a GGUF (the same weights as ours, f32 against f32).

    Any prompt, a given number of tokens (EOS not checked), no KV prefix reuse between generations.
    """

    name = "llama_cpp_f32"

    def __init__(self, model: Path, n_ctx: int) -> None:
        import llama_cpp
        from llama_cpp import Llama

        self.lc = llama_cpp
        self.f32, self.convert_s = cached_f32_gguf(model)
        self.threads = os.cpu_count() or 1
        t0 = time.perf_counter()
        self.llm = Llama(model_path=str(self.f32), n_ctx=n_ctx, n_threads=self.threads,
                         n_threads_batch=self.threads, verbose=False)
        self.load_s = time.perf_counter() - t0
        self.version = f"llama-cpp-python {llama_cpp.__version__}, F32 GGUF"

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's own tokenization of raw text (special tokens parsed, no BOS added)."""
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def generate(self, prompt_ids: Sequence[int], n: int) -> TimedTokens:
        self.llm.reset()
        self.lc.llama_perf_context_reset(self.llm.ctx)
        stamps, toks = [], []
        start = time.perf_counter()
        for tok in self.llm.generate(list(prompt_ids), temp=0.0, top_k=1, top_p=1.0, min_p=0.0,
                                     repeat_penalty=1.0):
            stamps.append(time.perf_counter())
            toks.append(int(tok))
            if len(toks) >= n:
                break
        perf = self.lc.llama_perf_context(self.llm.ctx)
        return TimedTokens(start, stamps, toks, perf.t_eval_ms, perf.n_eval)

    def close(self) -> None:
        self.llm.close()  # free the weights and context now, not at garbage collection


class LlamaCppRounds:
    """`dovetail bench target`'s view of llama.cpp: one fixed prompt, best of rounds.

    decode tok/s = (N-1) / (time from token 1 to token N), best run; llama's own eval counters are recorded too,
    as a cross-check that excludes Python and sampling.
    """

    name = LlamaCppEngine.name

    def __init__(self, model: Path, prompt: str, prompt_ids: Sequence[int], max_new_tokens: int) -> None:
        self.engine = LlamaCppEngine(model, n_ctx=max(1024, len(prompt_ids) + max_new_tokens))
        self.own_ids = self.engine.tokenize(prompt)
        self.prompt_ids = list(prompt_ids)
        self.n = max_new_tokens
        self.runs: list[dict[str, Any]] = []
        self.tokens: list[int] | None = None
        self.engine.generate(self.prompt_ids, min(8, max_new_tokens))  # warm-up

    def run_once(self) -> None:
        g = self.engine.generate(self.prompt_ids, self.n)
        self.tokens = self.tokens or g.tokens
        self.runs.append({"first_token_s": g.prefill_s, "total_s": g.total_s, "decode_s": g.decode_s,
                          "llama_eval_ms": g.eval_ms, "llama_n_eval": g.n_eval})

    def result(self) -> dict[str, Any]:
        n, e = self.n, self.engine
        best = min(self.runs, key=lambda r: r["decode_s"])
        evals = [r for r in self.runs if r["llama_n_eval"] > 0 and r["llama_eval_ms"] > 0]
        return {
            "engine": e.version,
            "gguf_f32": str(e.f32),
            "convert_s": e.convert_s,
            "threads": e.threads,
            "decode_tok_s": (n - 1) / best["decode_s"] if n > 1 and best["decode_s"] > 0 else None,
            "decode_method": "(N-1) / (time from first to last generated token), best run",
            "runs_decode_tok_s": [(n - 1) / r["decode_s"] for r in self.runs if r["decode_s"] > 0],
            "llama_eval_tok_s": max(r["llama_n_eval"] / r["llama_eval_ms"] * 1e3 for r in evals) if evals else None,
            "total_tok_s": n / best["total_s"],
            "prefill_s": best["first_token_s"],
            "load_s": e.load_s,
            "runs": self.runs,
            "prompt_tokenization_equal": self.own_ids == self.prompt_ids,
            "token_ids": self.tokens,
        }

    def close(self) -> None:
        self.engine.close()
