"""CPU engines: how well a given inference engine turns a CPU's bandwidth and FLOP/s into target forwards.

The same CPU decodes at very different speeds depending on what runs the target (on the team's 2-core machine,
SmolLM2-135M f32: ~26 tok/s in HF transformers, ~73 in this project, ~86 in llama.cpp), so a prediction for a
machine described only by its spec sheet needs the engine as an input. Each engine is a handful of numbers in
`simulator/data/cpu_engines.json` (one file, so it is easy to refit when an engine gets faster), every number with
its source. The numbers are relative to the preset they were fitted against, and they do not carry over between
CPUs: on a second 2-core VM (Intel Xeon, the same measured DRAM read rate as the AMD EPYC the shared file was
fitted on) llama.cpp decodes 1.9x slower, this project 1.4x slower and HF transformers 1.3x faster. A preset
fitted on its own machine names its own file (`cpu_engines` in the preset, e.g. `host-2core-intel-xeon`):

- `stream_frac`: weight-streaming rate of a decode step / the profile's achieved read bandwidth (mem_bw x bw_eff);
- `gemm_frac`: large multi-token GEMM FLOP/s / the profile's fp32 peak (`peak_flops`, the spec-sheet FMA peak);
- `n_half`: tokens per forward at which half of that GEMM rate is reached (small-M GEMMs are inefficient);
- `call_s`, `layer_s`: fixed overhead per forward and per decoder layer (graph build, eager op dispatch);
- `kv_bytes`: bytes per cached K/V element; `dtypes`: the weight formats the engine really has a path for, each
  with bytes per weight, a streaming factor and a compute cost per multiply-add relative to its f32 GEMM
  (dequantisation included). A dtype the engine has no path for is refused, not silently costed as f32.

A forward over n tokens then costs  call_s + layers x layer_s + max(weights / (BW x stream_scale) + KV / BW,
FLOPs x mac_cost / R(n)),  BW = min(mem_bw x bw_eff x stream_frac, mem_bw),  R(n) = peak_flops x gemm_frac x n /
(n + n_half).
The engine `profile` (the default) keeps the profile's own `flops_eff`, `bw_eff`, `n_half` and `dispatch_s`: right
for a `dovetail profile-hw` measurement, which times this project's own engine on the machine itself.

The GPU side has the same problem in another form: eager PyTorch is bound by its host, not by the GPU, at batch 1
(one host call per tensor op), so a `GpuFramework` (`simulator/data/gpu_frameworks.json`: `torch-eager`,
`cuda-graph`) gives the host calls per phase, counted in the reference code, and one measured host time per call;
a phase then costs max(GPU roofline, calls x call_s).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from simulator.errors import ConfigError

ENGINES_FILE = Path(__file__).parent / "data" / "cpu_engines.json"
PROFILE_ENGINE = "profile"  # the profile's own efficiency fields (today's behaviour, and the default)


@dataclass(frozen=True)
class DtypePath:
    """One weight format as an engine runs it."""

    bytes_per_weight: float
    stream_scale: float  # achieved streaming rate relative to the engine's f32 rate (dequant-bound paths < 1)
    mac_cost: float  # compute per multiply-add relative to the engine's f32 GEMM rate (dequantisation included)
    source: str


@dataclass(frozen=True)
class CpuEngine:
    name: str
    description: str
    stream_frac: float
    gemm_frac: float
    n_half: float
    call_s: float
    layer_s: float
    kv_bytes: float
    dtypes: dict[str, DtypePath] = field(compare=False)
    sources: dict[str, str] = field(compare=False, default_factory=dict)

    def __hash__(self) -> int:
        return hash(self.name)

    def path(self, dtype: str) -> DtypePath:
        """The engine's path for a target dtype, or a one-line refusal that lists the ones it has."""
        if dtype not in self.dtypes:
            raise ConfigError(f"cpu engine {self.name!r} has no real path for target dtype {dtype!r} "
                              f"(it runs: {', '.join(self.dtypes)})")
        return self.dtypes[dtype]


def _num(d: dict[str, Any], key: str, where: str, sources: dict[str, str], lo: float = 0.0,
         allow_zero: bool = False) -> float:
    v = d.get(key)
    if isinstance(v, dict):
        if v.get("source"):
            sources[key] = str(v["source"])
        v = v.get("value")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < lo or (
            v == lo and not allow_zero):
        raise ConfigError(f"cpu engine {where}: {key} must be a finite number {'>=' if allow_zero else '>'} {lo}, "
                          f"got {v!r}")
    return float(v)


def parse_engine(name: str, raw: Any) -> CpuEngine:
    """Validate one engine entry of the data file."""
    if not isinstance(raw, dict):
        raise ConfigError(f"cpu engine {name!r}: expected a JSON object")
    src: dict[str, str] = {}
    vals = {k: _num(raw, k, name, src, allow_zero=k in ("call_s", "layer_s"))
            for k in ("stream_frac", "gemm_frac", "n_half", "call_s", "layer_s", "kv_bytes")}
    if vals["gemm_frac"] > 1:
        raise ConfigError(f"cpu engine {name!r}: gemm_frac is a fraction of peak and must be <= 1")
    dts = raw.get("dtypes")
    if not isinstance(dts, dict) or not dts:
        raise ConfigError(f"cpu engine {name!r}: needs a non-empty 'dtypes' object")
    paths = {}
    for dt, d in dts.items():
        if not isinstance(d, dict):
            raise ConfigError(f"cpu engine {name!r}: dtype {dt!r} must be an object")
        s: dict[str, str] = {}
        paths[dt] = DtypePath(_num(d, "bytes_per_weight", f"{name}/{dt}", s),
                              _num(d, "stream_scale", f"{name}/{dt}", s),
                              _num(d, "mac_cost", f"{name}/{dt}", s), str(d.get("source", "")))
    return CpuEngine(name, str(raw.get("description", "")), dtypes=paths, sources=src, **vals)


def _read_section(path: str, key: str, what: str) -> dict[str, Any]:
    """The non-empty object `key` of the JSON file `path` (one clear error otherwise)."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {what} {path!r}: {e}") from None
    section = raw.get(key) if isinstance(raw, dict) else None
    if not isinstance(section, dict) or not section:
        raise ConfigError(f"{path}: expected a non-empty {key!r} object")
    return section


@lru_cache(maxsize=4)
def _load(path: str) -> dict[str, CpuEngine]:
    return {n: parse_engine(n, e) for n, e in _read_section(path, "engines", "cpu engines").items()}


def engines_path(engines_file: str | None = None) -> Path:
    """The engines data file: `simulator/data/cpu_engines.json`, or another file of `simulator/data` that a
    preset names (`cpu_engines`: engines fitted against that preset, on that machine)."""
    if not engines_file:
        return ENGINES_FILE
    p = ENGINES_FILE.parent / engines_file
    if Path(engines_file).name != engines_file or not p.is_file():
        raise ConfigError(f"cpu engines file {engines_file!r}: not a file of {ENGINES_FILE.parent}")
    return p


def engine_names(engines_file: str | None = None) -> list[str]:
    """`profile` first, then the engines of the data file."""
    return [PROFILE_ENGINE, *_load(str(engines_path(engines_file)))]


def resolve_engine(name: str | None, engines_file: str | None = None) -> CpuEngine | None:
    """None for `profile` (or None), else the named engine (of `engines_file`, default the shared data file);
    unknown names list the choices."""
    if name is None or name == PROFILE_ENGINE:
        return None
    engines = _load(str(engines_path(engines_file)))
    if name not in engines:
        raise ConfigError(f"unknown cpu engine {name!r}; choose from {', '.join(engine_names(engines_file))}")
    return engines[name]


# ---------------------------------------------------------------------------------------------------------------
# GPU frameworks: the host-side work of what runs the model on the GPU

GPU_FRAMEWORKS_FILE = Path(__file__).parent / "data" / "gpu_frameworks.json"
_FW_NUMBERS = ("call_s", "calls_per_layer", "calls_per_step", "calls_per_tree_verify", "draft_calls_per_pass",
               "draft_calls_per_level", "draft_calls_per_cycle", "attn_score_bytes")
# decode loops other than EAGLE's own, by the code a published baseline ran (`<loop>_<number>` in the data file)
DECODE_LOOPS = ("hf-generate", "sequoia")
_LOOP_NUMBERS = ("calls_per_layer", "calls_per_step", "attn_score_bytes")


@dataclass(frozen=True)
class TreeAssembly:
    """Host calls that turn a drafted tree into the verification inputs: fixed + per draft token."""

    fixed: float
    per_token: float


@dataclass(frozen=True)
class DecodeLoop:
    """One plain decode loop's host calls (per decoder layer, per step outside the layers) and attention traffic."""

    calls_per_layer: float
    calls_per_step: float
    attn_score_bytes: float


@dataclass(frozen=True)
class GpuFramework:
    """Host calls per phase of what runs on the GPU, and the host time of one call.

    Eager PyTorch issues one host call (Python, dispatcher, allocator, kernel launch) per tensor operation; the
    launches are asynchronous, so a phase that ends in a host sync costs max(GPU roofline, calls x call_s): an
    eager 7B decode on a fast GPU is bound by the host, not by the weights (the PyTorch team's eager LLaMA-7B
    runs at 25.5 tok/s on an A100 that streams its weights in ~7 ms). A graph framework (CUDA graphs, XLA) has
    call_s = 0. Counts are of the reference code (`simulator/data/gpu_frameworks.json`, each with its source).
    """

    name: str
    description: str
    call_s: float
    calls_per_layer: float  # one target decoder layer (EAGLE's modeling_llama_kv: unfused attention)
    calls_per_step: float  # a decode step outside the layers (embedding, masks, norm, head, sampling loop)
    calls_per_tree_verify: float  # a tree verification outside the layers (tree mask, posterior, KV compaction)
    draft_calls_per_pass: float  # one forward of a 1-layer EAGLE-style draft
    draft_calls_per_level: float  # head, top-k and tree bookkeeping per level
    draft_calls_per_cycle: float  # once per drafted tree, before the levels
    attn_score_bytes: float  # GPU bytes moved per attention score by an unfused attention (0 = fused / flash)
    trees: dict[str, TreeAssembly] = field(compare=False)
    sources: dict[str, str] = field(compare=False, default_factory=dict)
    loops: dict[str, DecodeLoop] = field(compare=False, default_factory=dict)

    def __hash__(self) -> int:
        return hash(self.name)

    def dispatch_s(self, calls: float) -> float:
        return calls * self.call_s

    def loop(self, name: str | None) -> DecodeLoop:
        """The named decode loop (None: EAGLE's own model with HF generate's step, the top-level numbers)."""
        if name is None:
            return DecodeLoop(self.calls_per_layer, self.calls_per_step, self.attn_score_bytes)
        if name not in self.loops:
            raise ConfigError(f"gpu framework {self.name!r} has no decode loop {name!r} (it has: "
                              f"{', '.join(self.loops)})")
        return self.loops[name]

    def tree_assembly_s(self, kind: str, tokens: int) -> float:
        """Host time to assemble a `tokens`-token tree of the draft `kind` (eagle1: static, eagle2: dynamic)."""
        if kind not in self.trees:
            raise ConfigError(f"gpu framework {self.name!r} has no tree assembly for {kind!r} "
                              f"(it has: {', '.join(self.trees)})")
        t = self.trees[kind]
        return self.call_s * (t.fixed + t.per_token * max(tokens - 1, 0))


def parse_gpu_framework(name: str, raw: Any) -> GpuFramework:
    """Validate one framework entry of the data file."""
    if not isinstance(raw, dict):
        raise ConfigError(f"gpu framework {name!r}: expected a JSON object")
    src: dict[str, str] = {}
    vals = {k: _num(raw, k, f"gpu framework {name}", src, allow_zero=True) for k in _FW_NUMBERS}
    drafts = raw.get("drafts")
    if not isinstance(drafts, dict) or not drafts:
        raise ConfigError(f"gpu framework {name!r}: needs a non-empty 'drafts' object")
    trees = {}
    for kind, d in drafts.items():
        if not isinstance(d, dict):
            raise ConfigError(f"gpu framework {name!r}: draft {kind!r} must be an object")
        s: dict[str, str] = {}
        trees[kind] = TreeAssembly(_num(d, "tree_calls_fixed", f"{name}/{kind}", s, allow_zero=True),
                                   _num(d, "tree_calls_per_token", f"{name}/{kind}", s, allow_zero=True))
    loops = {ln: DecodeLoop(*(_num(raw, f"{ln.replace('-', '_')}_{k}", f"gpu framework {name}", src,
                                   allow_zero=True) for k in _LOOP_NUMBERS)) for ln in DECODE_LOOPS}
    return GpuFramework(name, str(raw.get("description", "")), trees=trees, sources=src, loops=loops, **vals)


@lru_cache(maxsize=4)
def _load_gpu(path: str) -> dict[str, GpuFramework]:
    return {n: parse_gpu_framework(n, f) for n, f in _read_section(path, "frameworks", "gpu frameworks").items()}


def gpu_framework_names() -> list[str]:
    return list(_load_gpu(str(GPU_FRAMEWORKS_FILE)))


def resolve_gpu_framework(name: str | None) -> GpuFramework | None:
    """None for None (the profile's own `gpu.layer_s` only, as before), else the named framework."""
    if name is None:
        return None
    fws = _load_gpu(str(GPU_FRAMEWORKS_FILE))
    if name not in fws:
        raise ConfigError(f"unknown gpu framework {name!r}; choose from {', '.join(fws)}")
    return fws[name]
