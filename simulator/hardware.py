"""Hardware profiles: CPU, GPU and the link between them, loaded from JSON presets or `profile-hw` output.

Every number in a preset carries its source, because a simulator is only as credible as its inputs; the loader
validates every field up front so a bad profile fails with one message instead of a nonsense tokens/s.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from simulator.errors import ConfigError

PRESET_DIR = Path(__file__).parent / "presets"

# PCI-SIG per-lane raw rates (GT/s) and line-code efficiency; 6.0 uses FLIT mode (242/256 payload).
_PCIE_GTS = {1: 2.5, 2: 5.0, 3: 8.0, 4: 16.0, 5: 32.0, 6: 64.0}
_PCIE_CODE = {1: 8 / 10, 2: 8 / 10, 3: 128 / 130, 4: 128 / 130, 5: 128 / 130, 6: 242 / 256}


def pcie_bandwidth(gen: int, lanes: int) -> float:
    """Theoretical one-direction PCIe bandwidth in bytes/s (e.g. Gen3 x16 -> 15.75e9)."""
    if gen not in _PCIE_GTS:
        raise ConfigError(f"link.gen must be one of {sorted(_PCIE_GTS)}, got {gen!r}")
    if lanes not in (1, 2, 4, 8, 16, 32):
        raise ConfigError(f"link.lanes must be one of 1, 2, 4, 8, 16, 32, got {lanes!r}")
    return _PCIE_GTS[gen] * 1e9 * _PCIE_CODE[gen] * lanes / 8


class _Roofline:
    """Achieved compute and bandwidth: the peak times the fitted efficiency."""

    peak_flops: float
    flops_eff: float
    mem_bw: float
    bw_eff: float

    @property
    def flops(self) -> float:
        return self.peak_flops * self.flops_eff

    @property
    def bw(self) -> float:
        return self.mem_bw * self.bw_eff


@dataclass(frozen=True)
class CpuSpec(_Roofline):
    """The CPU that runs the target. Rates are peaks; `*_eff` are the achieved fractions."""

    name: str
    cores: int
    peak_flops: float  # fp32 FLOP/s
    mem_bw: float  # bytes/s
    flops_eff: float  # achieved / peak for large matmuls
    bw_eff: float  # achieved / peak streaming read
    n_half: float  # tokens per matmul at which half of the achieved FLOP/s is reached
    dispatch_s: float  # per framework call (jit dispatch, Python op) overhead
    ram_bytes: float

    @property
    def overhead_s(self) -> float:
        return self.dispatch_s

    @property
    def mem_bytes(self) -> float:
        return self.ram_bytes


@dataclass(frozen=True)
class GpuSpec(_Roofline):
    """The accelerator that runs the draft. `shares_cpu` marks a stand-in device on the same cores as the CPU."""

    name: str
    peak_flops: float  # FLOP/s at the draft dtype (fp16 tensor or fp32, as the preset says)
    mem_bw: float
    vram_bytes: float
    flops_eff: float
    bw_eff: float
    n_half: float
    launch_s: float  # per kernel / jit-call launch overhead
    reserved_bytes: float = 0.0  # runtime context and allocator slack not available to the model
    shares_cpu: bool = False
    layer_s: float = 0.0  # per decoder layer per pass: an eager framework's op dispatch (0 = CUDA graphs / XLA);
    # a workload's gpu_framework (simulator/data/gpu_frameworks.json: counted host calls) replaces it

    @property
    def overhead_s(self) -> float:
        return self.launch_s

    @property
    def mem_bytes(self) -> float:
        return self.vram_bytes - self.reserved_bytes


@dataclass(frozen=True)
class LinkSpec:
    """CPU<->GPU link: PCIe generation and lanes give the peak; `bandwidth` overrides it when measured."""

    gen: int
    lanes: int
    efficiency: float  # achieved / theoretical
    latency_s: float  # per transfer (launch + sync)
    bandwidth: float = 0.0  # bytes/s, 0 = derive from gen and lanes

    @property
    def peak(self) -> float:
        return self.bandwidth if self.bandwidth > 0 else pcie_bandwidth(self.gen, self.lanes)

    @property
    def bw(self) -> float:
        return self.peak * self.efficiency

    def seconds(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.bw


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    cpu: CpuSpec
    gpu: GpuSpec
    link: LinkSpec
    description: str = ""
    sources: dict[str, str] = field(default_factory=dict, compare=False)
    cpu_engines: str = ""  # the engines file (simulator/data) fitted against this profile; "" = the shared one

    def with_link(self, gen: int | None = None, lanes: int | None = None, bandwidth: float | None = None
                  ) -> HardwareProfile:
        """The same machine on another link (what-if: 'speedup vs PCIe bandwidth')."""
        link = self.link
        if gen is not None or lanes is not None:
            link = replace(link, gen=link.gen if gen is None else gen,  # 0 is refused, never the default
                           lanes=link.lanes if lanes is None else lanes, bandwidth=0.0)
            pcie_bandwidth(link.gen, link.lanes)
        if bandwidth is not None:
            _positive("link.bandwidth", bandwidth, self.name)
            link = replace(link, bandwidth=bandwidth)
        return replace(self, link=link)

    def with_vram(self, vram_bytes: float) -> HardwareProfile:
        _positive("gpu.vram_bytes", vram_bytes, self.name)
        return replace(self, gpu=replace(self.gpu, vram_bytes=vram_bytes))

    def with_memory_bandwidth(self, scale: float) -> HardwareProfile:
        """The same machine on DRAM that reads `scale` times as fast: another hour of it (here ~22-57 GB/s apart).

        cpu.mem_bw scales, and with it every CPU read (an engine streams at min(mem_bw x bw_eff x stream_frac,
        mem_bw)), so a memory-bound decode step takes 1/scale the time while compute and fixed overheads stay; a
        stand-in accelerator on the same cores (gpu.shares_cpu) reads the same DRAM and scales alike, a real GPU's
        memory does not. Sources say so; `self` is unchanged."""
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise ConfigError(f"memory bandwidth scale must be a positive finite number, got {scale!r}")
        note = f" (x {scale:.4g}: scaled to a run's measured read bandwidth)"
        sources = dict(self.sources)
        sources["cpu.mem_bw"] = sources.get("cpu.mem_bw", "") + note
        gpu = self.gpu
        if gpu.shares_cpu:
            gpu = replace(gpu, mem_bw=gpu.mem_bw * scale)
            sources["gpu.mem_bw"] = sources.get("gpu.mem_bw", "") + note
        return replace(self, cpu=replace(self.cpu, mem_bw=self.cpu.mem_bw * scale), gpu=gpu, sources=sources)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON with `{value, source}` pairs where a source is known (round-trips through `parse_profile`)."""
        out: dict[str, Any] = {"name": self.name, "description": self.description}
        if self.cpu_engines:
            out["cpu_engines"] = {"value": self.cpu_engines, "source": self.sources.get("cpu_engines", "")}
        for sect in ("cpu", "gpu", "link"):
            d = asdict(getattr(self, sect))
            out[sect] = {k: ({"value": v, "source": self.sources[f"{sect}.{k}"]} if f"{sect}.{k}" in self.sources
                             else v) for k, v in d.items()}
        return out


_OPTIONAL = {"gpu.reserved_bytes": 0.0, "gpu.shares_cpu": False, "gpu.layer_s": 0.0, "link.bandwidth": 0.0}
_FRACTIONS = {"cpu.flops_eff", "cpu.bw_eff", "gpu.flops_eff", "gpu.bw_eff", "link.efficiency"}


def _positive(name: str, v: Any, where: str) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ConfigError(f"profile {where!r}: {name} must be a positive finite number, got {v!r}")


def _section(raw: dict[str, Any], sect: str, cls: type, where: str, sources: dict[str, str]) -> Any:
    body = raw.get(sect)
    if not isinstance(body, dict):
        raise ConfigError(f"profile {where!r}: missing section {sect!r}")
    kw: dict[str, Any] = {}
    for f in fields(cls):
        key = f"{sect}.{f.name}"
        if f.name not in body:
            if key in _OPTIONAL:
                kw[f.name] = _OPTIONAL[key]
                continue
            raise ConfigError(f"profile {where!r}: missing field {key}")
        v = body[f.name]
        if isinstance(v, dict):
            if "value" not in v:
                raise ConfigError(f"profile {where!r}: field {key} has no 'value'")
            if v.get("source"):
                sources[key] = str(v["source"])
            v = v["value"]
        if f.name == "name":
            kw[f.name] = str(v)
        elif f.name == "shares_cpu":
            if not isinstance(v, bool):
                raise ConfigError(f"profile {where!r}: {key} must be true or false, got {v!r}")
            kw[f.name] = v
        elif key in _OPTIONAL:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"profile {where!r}: {key} must be a finite number >= 0, got {v!r}")
            kw[f.name] = float(v)
        else:
            _positive(key, v, where)
            if key in _FRACTIONS and v > 1:
                raise ConfigError(f"profile {where!r}: {key} is a fraction of peak and must be <= 1, "
                                  f"got {v!r}")
            if f.name in ("cores", "gen", "lanes") and int(v) != v:
                raise ConfigError(f"profile {where!r}: {key} must be an integer, got {v!r}")
            kw[f.name] = int(v) if f.name in ("cores", "gen", "lanes") else float(v)
    return cls(**kw)


def parse_profile(raw: Any, where: str = "<dict>") -> HardwareProfile:
    """Validate a profile dict (numbers or `{value, source}` pairs) into a HardwareProfile."""
    if not isinstance(raw, dict):
        raise ConfigError(f"profile {where!r}: expected a JSON object")
    sources: dict[str, str] = {}
    cpu = _section(raw, "cpu", CpuSpec, where, sources)
    gpu = _section(raw, "gpu", GpuSpec, where, sources)
    link = _section(raw, "link", LinkSpec, where, sources)
    pcie_bandwidth(link.gen, link.lanes)
    if gpu.reserved_bytes >= gpu.vram_bytes:
        raise ConfigError(f"profile {where!r}: gpu.reserved_bytes must be below gpu.vram_bytes")
    engines = raw.get("cpu_engines", "")
    if isinstance(engines, dict):
        if engines.get("source"):
            sources["cpu_engines"] = str(engines["source"])
        engines = engines.get("value", "")
    if not isinstance(engines, str) or Path(engines).name != engines:
        raise ConfigError(f"profile {where!r}: cpu_engines must be a file name in simulator/data, got {engines!r}")
    return HardwareProfile(name=str(raw.get("name", where)), cpu=cpu, gpu=gpu, link=link,
                           description=str(raw.get("description", "")), sources=sources, cpu_engines=engines)


MEASURED_TAG = "measured by dovetail profile-hw"


def default_engine(hw: HardwareProfile) -> str:
    """The CPU engine `--cpu-engine auto` means: the profile's own rates when `profile-hw` measured them (they
    are this project's engine on that machine), else this project's engine as fitted (`dovetail-jax`)."""
    return "profile" if hw.sources.get("cpu.flops_eff", "").startswith(MEASURED_TAG) else "dovetail-jax"


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_profile(name_or_path: str | Path) -> HardwareProfile:
    """A preset name (see `list_presets`) or a JSON file path, e.g. the output of `dovetail profile-hw`."""
    p = Path(name_or_path)
    if not p.suffix and (PRESET_DIR / f"{name_or_path}.json").exists():
        p = PRESET_DIR / f"{name_or_path}.json"
    if not p.exists():
        raise ConfigError(f"no hardware profile {str(name_or_path)!r}: not a file and not a preset "
                          f"(presets: {', '.join(list_presets())})")
    try:
        raw = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read hardware profile {str(p)!r}: {e}") from None
    return parse_profile(raw, str(name_or_path))
