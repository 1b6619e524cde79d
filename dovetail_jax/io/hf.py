"""Load a Hugging Face LLaMA checkpoint folder (`config.json` + `*.safetensors`) into float32 numpy arrays.

The safetensors format is read directly with numpy + ml_dtypes: it handles bf16 (numpy has no bf16, so
`safetensors`' numpy backend refuses it) without pulling JAX or torch into loading.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from dovetail_jax.config import ModelConfig
from dovetail_jax.errors import ModelFormatError

SUPPORTED_MODEL_TYPES = ("llama",)
_DTYPES: dict[str, Any] = {
    "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64,
    "I32": np.int32, "I64": np.int64,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
# Buffers some old checkpoints carry; they are recomputed from the config, never learned.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"{path}: cannot read JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path}: expected a JSON object")
    return data


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of one .safetensors file, floats as float32 (integers keep their type); errors name the file
    and the tensor."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > size - 8:
            raise ModelFormatError(f"{path}: not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelFormatError(f"{path}: damaged safetensors header ({e})") from None
    body = size - 8 - n
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n, shape=(body,)) if body else np.zeros(0, np.uint8)
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise ModelFormatError(f"{path}: tensor '{name}' has unsupported dtype {info.get('dtype')}")
        shape = tuple(int(d) for d in info["shape"])
        begin, end = (int(x) for x in info["data_offsets"])
        if end > body or end - begin != math.prod(shape) * np.dtype(dtype).itemsize:
            raise ModelFormatError(f"{path}: tensor '{name}' data is out of bounds (truncated file?)")
        x = data[begin:end].view(dtype).reshape(shape)
        out[name] = x.astype(np.float32) if np.issubdtype(np.dtype(dtype), np.floating) or dtype is ml_dtypes.bfloat16 \
            else np.array(x)
    return out


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (keeping each array's dtype: float32, bfloat16, int32...) as one .safetensors file."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    arrays = []
    for name in sorted(tensors):
        x = np.asarray(tensors[name])
        if not x.flags.c_contiguous:  # (np.ascontiguousarray would also turn a 0-d array into 1-d)
            x = np.ascontiguousarray(x)
        if x.dtype not in _NAMES:
            raise ValueError(f"tensor '{name}': dtype {x.dtype} cannot be stored in safetensors here")
        header[name] = {"dtype": _NAMES[x.dtype], "shape": list(x.shape), "data_offsets": [offset, offset + x.nbytes]}
        offset += x.nbytes
        arrays.append(x)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns the data to 8 bytes
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for x in arrays:
            f.write(x.tobytes())


def _rope_theta(cfg: dict[str, Any], source: str) -> float:
    """rope_theta from transformers v5 (`rope_parameters`) or v4 (top level + `rope_scaling`) configs."""
    theta = cfg.get("rope_theta")
    for key in ("rope_parameters", "rope_scaling"):
        rp = cfg.get(key)
        if not rp:
            continue
        if not isinstance(rp, dict):
            raise ModelFormatError(f"{source}: '{key}' must be a JSON object")
        kind = rp.get("rope_type", rp.get("type", "default"))
        if kind not in ("default", None):
            raise ModelFormatError(f"{source}: RoPE scaling type '{kind}' is not implemented (only plain RoPE)")
        theta = rp.get("rope_theta", theta)
    return float(theta if theta is not None else 10000.0)


def config_from_hf(cfg: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """ModelConfig from a parsed HF `config.json`; refuses features the model code does not implement."""
    kind = cfg.get("model_type")
    if kind not in SUPPORTED_MODEL_TYPES:
        raise ModelFormatError(
            f"{source}: unsupported architecture '{kind}' (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise ModelFormatError(f"{source}: {flag}=true is not supported")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ModelFormatError(f"{source}: hidden_act '{cfg['hidden_act']}' is not supported (only silu)")
    if cfg.get("pretraining_tp", 1) not in (1, None):
        raise ModelFormatError(f"{source}: pretraining_tp != 1 is not supported")
    try:
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        eos = cfg.get("eos_token_id")
        eos_ids = eos if isinstance(eos, list) else ([] if eos is None else [eos])
        return ModelConfig(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rope_theta=_rope_theta(cfg, source),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            name=str(cfg.get("_name_or_path") or Path(source).parent.name or "llama"),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=tuple(dict.fromkeys(int(i) for i in eos_ids)),
        )
    except KeyError as e:
        raise ModelFormatError(f"{source}: missing key {e}") from None
    except (ValueError, TypeError, ZeroDivisionError) as e:
        raise ModelFormatError(f"{source}: bad value: {e}") from None


def _shard_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelFormatError(f"{index}: missing 'weight_map'")
        files = [folder / f for f in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.is_file():
                raise ModelFormatError(f"{index}: shard '{f.name}' is missing")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelFormatError(f"{folder}: no *.safetensors weights (pytorch_model.bin is not supported)")
    return files


def load_hf(folder: str | Path) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Config and float32 tensors (HF names, `[out, in]`) of a HF LLaMA folder, sharded or not."""
    from dovetail_jax.model.params import check_tensors, expected_shapes

    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ModelFormatError(f"{folder}: no config.json (not a Hugging Face model folder)")
    raw = _read_json(cfg_path)
    gen_path = folder / "generation_config.json"
    gen_eos = _read_json(gen_path).get("eos_token_id") if gen_path.is_file() else None

    tensors: dict[str, np.ndarray] = {}
    for f in _shard_files(folder):
        for name, arr in read_safetensors(f).items():
            if not name.endswith(_IGNORED_SUFFIXES):
                tensors[name] = arr
    cfg = config_from_hf(raw, source=str(cfg_path))
    if gen_eos is not None:  # generate() stops on these; keep config.json's too
        extra = gen_eos if isinstance(gen_eos, list) else [gen_eos]
        cfg = cfg.replace(eos_token_ids=tuple(dict.fromkeys([*map(int, extra), *cfg.eos_token_ids])))
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)

    check_tensors(cfg, tensors, str(folder))
    extra_names = sorted(set(tensors) - set(expected_shapes(cfg)))
    if extra_names:
        raise ModelFormatError(f"{folder}: unsupported tensor '{extra_names[0]}' (not part of a plain LLaMA model)")
    return cfg, tensors
