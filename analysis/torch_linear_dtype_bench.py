"""Relative cost of PyTorch's CPU weight formats on one LLaMA-7B-sized Linear (4096 -> 11008, 180 MB in f32).

    python analysis/torch_linear_dtype_bench.py [--out analysis/results/bench_torch_linear_dtypes.json]

Why: the simulator's `hf-torch` engine needs, per weight format, how fast a decode step streams the weights
(T = 1, weights out of cache) and how fast a verification GEMM computes (T = 32) relative to f32. The formats are
timed back to back, alternating, so other load on a shared machine hits them alike and the *ratios* stay
meaningful even when absolute times do not. int8 = `torch.ao.quantization.quantize_dynamic` (fbgemm: int8 weights,
activations quantised per call), the Dovetail laptop's path; bf16 = bfloat16 weights and activations.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results" / "bench_torch_linear_dtypes.json"
TOKENS = (1, 8, 32)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    lin = torch.nn.Linear(4096, 11008, bias=False).eval()
    models = {"f32": lin, "bf16": torch.nn.Linear(4096, 11008, bias=False).to(torch.bfloat16).eval(),
              "int8": torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear},
                                                             dtype=torch.qint8).eval()}
    # a second f32 copy evicts the caches between calls (the weights stream from DRAM as in a decode step)
    flush = torch.randn(64 * 2 ** 20 // 4)
    times: dict[str, dict[int, list[float]]] = {k: {t: [] for t in TOKENS} for k in models}
    load = [os.getloadavg()[0]]
    with torch.inference_mode():
        for _ in range(args.rounds):
            for t in TOKENS:
                for name, m in models.items():
                    x = torch.randn(t, 4096, dtype=torch.bfloat16 if name == "bf16" else torch.float32)
                    flush.mul_(1.0)
                    t0 = time.perf_counter()
                    m(x)
                    times[name][t].append(time.perf_counter() - t0)
    load.append(os.getloadavg()[0])
    best = {k: {t: min(v) for t, v in d.items()} for k, d in times.items()}
    res = {"schema": "dovetail.bench.torch_linear_dtypes/1", "command": "python analysis/torch_linear_dtype_bench.py",
           "when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
           "shape": [4096, 11008], "load_average_1m": load, "rounds": args.rounds,
           "best_ms": {k: {str(t): 1e3 * v for t, v in d.items()} for k, d in best.items()},
           "median_ms": {k: {str(t): 1e3 * statistics.median(v) for t, v in d.items()} for k, d in times.items()},
           "ratio_to_f32_best": {k: {str(t): best[k][t] / best["f32"][t] for t in TOKENS} for k in models}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    for k in models:
        print(k, " ".join(f"T={t}: {1e3 * best[k][t]:.2f} ms (x{best[k][t] / best['f32'][t]:.2f})" for t in TOKENS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
