"""Load a LLaMA-family GGUF file (llama.cpp's format) into float32 arrays under Hugging Face names.

GGUF stores q/k rows permuted for llama.cpp's adjacent-pair RoPE; we undo that here so every
loader hands the model the same HF rotate-half layout (see `dovetail_jax.model.params`).
Any problem with the file becomes one `ModelFormatError` naming the file and the culprit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType
from gguf.quants import dequantize

from dovetail_jax.config import ModelConfig
from dovetail_jax.errors import ModelFormatError

GGUF_MAGIC = b"GGUF"
SUPPORTED_ARCHITECTURES = ("llama",)

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


class _TensorInfoError(Exception):
    def __init__(self, tensor: str, problem: str) -> None:
        super().__init__(f"tensor '{tensor}': {problem}")


class _CheckedReader(gguf.GGUFReader):
    """GGUFReader that names the tensor whose type is unknown or whose data runs past the end of the file.

    The stock reader fails on a truncated file with a bare numpy reshape error; this check runs first.
    """

    def _build_tensors(self, start_offs: int, fields: list[Any]) -> None:
        size = len(self.data)
        for field in fields:
            _, name_data, _, dims, raw_dtype, offset = field.parts
            name = bytes(name_data).decode("utf-8", "replace")
            try:
                qtype = GGMLQuantizationType(int(raw_dtype[0]))
            except ValueError:
                raise _TensorInfoError(name, f"unknown ggml type id {int(raw_dtype[0])}") from None
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            end = start_offs + int(offset[0]) + int(np.prod(dims)) * type_size // block
            if end > size:
                raise _TensorInfoError(name, f"data ends at byte {end} but the file has only {size} bytes (truncated?)")
        super()._build_tensors(start_offs, fields)


def _open(path: str | Path) -> tuple[Path, gguf.GGUFReader]:
    p = Path(path)
    if not p.is_file():
        raise ModelFormatError(f"{p}: no such file")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelFormatError(f"{p}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
    try:
        return p, _CheckedReader(p)
    except _TensorInfoError as e:
        raise ModelFormatError(f"{p}: {e}") from None
    except Exception as e:  # the reader raises ValueError/IndexError/... on a damaged header
        raise ModelFormatError(f"{p}: damaged or truncated GGUF file ({type(e).__name__}: {e})") from None


def _metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        if field.types and field.types[0] == GGUFValueType.ARRAY and not isinstance(value, list):
            value = [value]
        out[key] = value
    return out


def _read_metadata(p: Path, reader: gguf.GGUFReader) -> dict[str, Any]:
    try:
        return _metadata(reader)
    except (UnicodeDecodeError, ValueError, IndexError) as e:
        raise ModelFormatError(f"{p}: damaged GGUF metadata ({e})") from None


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """All key/value metadata of a GGUF file as plain Python values (strings, numbers, lists)."""
    return _read_metadata(*_open(path))


def _float32_value(x: float) -> float:
    """GGUF stores floats as f32: 1e-5 comes back as 9.9999997e-06; return the shortest decimal (1e-05)."""
    return float(str(np.float32(x)))


def _check_architecture(meta: dict[str, Any], source: str) -> str:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelFormatError(
            f"{source}: unsupported architecture '{arch}' (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    return str(arch)


def _config(meta: dict[str, Any], vocab_size: int, tied: bool, source: str) -> ModelConfig:
    arch = _check_architecture(meta, source)

    def get(key: str, default: Any = None) -> Any:
        full = f"{arch}.{key}"
        if full not in meta and default is None:
            raise ModelFormatError(f"{source}: missing metadata key '{full}'")
        return meta.get(full, default)

    try:
        scaling = get("rope.scaling.type", "none")
        if scaling not in ("none", "", None):
            raise ModelFormatError(f"{source}: RoPE scaling type '{scaling}' is not implemented")
        hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
        if heads <= 0:
            raise ModelFormatError(f"{source}: {arch}.attention.head_count must be positive, got {heads}")
        head_dim = int(get("attention.key_length", hidden // heads))
        if int(get("attention.value_length", head_dim)) != head_dim:
            raise ModelFormatError(f"{source}: attention.value_length != key_length is not supported")
        if int(get("rope.dimension_count", head_dim)) != head_dim:
            raise ModelFormatError(f"{source}: partial RoPE (rope.dimension_count != head_dim) is not supported")
        tok = "tokenizer.ggml."
        eos = [meta[tok + k] for k in ("eos_token_id", "eot_token_id", "eom_token_id") if tok + k in meta]
        return ModelConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_layers=int(get("block_count")),
            num_heads=heads,
            num_kv_heads=int(get("attention.head_count_kv", heads)),
            head_dim=head_dim,
            rope_theta=_float32_value(get("rope.freq_base", 10000.0)),
            rms_norm_eps=_float32_value(get("attention.layer_norm_rms_epsilon")),
            max_position_embeddings=int(get("context_length", 2048)),
            tie_word_embeddings=tied,
            name=str(meta.get("general.name") or Path(source).stem),
            bos_token_id=meta.get(tok + "bos_token_id"),
            eos_token_ids=tuple(dict.fromkeys(int(i) for i in eos)),
        )
    except (ValueError, TypeError) as e:  # e.g. per-layer head counts (a list), or a non-positive size
        raise ModelFormatError(f"{source}: unsupported or inconsistent model metadata: {e}") from None


def hf_name(gguf_name: str) -> str | None:
    """The HF LLaMA name of a GGUF tensor name, or None if it is not part of a plain LLaMA."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES \
            and parts[3] == "weight":
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.weight"
    return None


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's per-head row permutation (pairs (2i, 2i+1) -> HF's (i, i + d/2))."""
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _tensors(
    reader: gguf.GGUFReader, meta: dict[str, Any], source: str
) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    from dovetail_jax.model.params import expected_shapes

    _check_architecture(meta, source)  # before tensor names: another architecture has other tensors
    by_name = {t.name: t for t in reader.tensors}
    for name in by_name:
        if hf_name(name) is None:
            raise ModelFormatError(f"{source}: unsupported tensor '{name}' (not part of a plain LLaMA model)")
    if "token_embd.weight" not in by_name:
        raise ModelFormatError(f"{source}: missing tensor 'token_embd.weight'")
    vocab = int(by_name["token_embd.weight"].shape[-1])
    cfg = _config(meta, vocab, tied="output.weight" not in by_name, source=source)
    hf_to_gguf = {hf_name(n): n for n in by_name}
    shapes = expected_shapes(cfg)
    for hf, shape in shapes.items():
        if hf not in hf_to_gguf:
            raise ModelFormatError(f"{source}: missing tensor '{_gguf_name(hf)}' ({hf}, expected shape {shape})")
        gname = hf_to_gguf[hf]
        got = tuple(int(d) for d in reversed(by_name[gname].shape.tolist()))
        if got != shape:
            raise ModelFormatError(f"{source}: tensor '{gname}' ({hf}) has shape {got}, expected {shape}")
    extra = sorted(set(hf_to_gguf) - set(shapes))
    if extra:
        n = cfg.num_layers
        raise ModelFormatError(f"{source}: unexpected tensor '{hf_to_gguf[extra[0]]}' for a {n}-layer model")

    out: dict[str, np.ndarray] = {}
    for hf, gname in hf_to_gguf.items():
        t = by_name[gname]
        try:
            w = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ModelFormatError(
                f"{source}: tensor '{gname}' has unsupported type {t.tensor_type.name}"
            ) from None
        w = np.array(w, dtype=np.float32, copy=t.tensor_type == GGMLQuantizationType.F32).reshape(shapes[hf])
        if gname.endswith("attn_q.weight"):
            w = unpermute_qk(w, cfg.num_heads)
        elif gname.endswith("attn_k.weight"):
            w = unpermute_qk(w, cfg.num_kv_heads)
        out[hf] = w
    return cfg, out


def _gguf_name(hf: str) -> str:
    inverse = {v: k for k, v in _GLOBAL_NAMES.items()}
    if hf in inverse:
        return inverse[hf]
    _, _, layer, *mid, _ = hf.split(".")
    short = {v: k for k, v in _LAYER_NAMES.items()}[".".join(mid)]
    return f"blk.{layer}.{short}.weight"


def load_gguf_with_metadata(path: str | Path) -> tuple[ModelConfig, dict[str, np.ndarray], dict[str, Any]]:
    """Config, float32 HF-named tensors and raw metadata from one read of the file (the tokenizer needs the latter)."""
    p, reader = _open(path)
    meta = _read_metadata(p, reader)
    cfg, tensors = _tensors(reader, meta, str(p))
    return cfg, tensors, meta


def load_gguf(path: str | Path) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Config (from the file's own metadata) and float32 tensors under HF LLaMA names, q/k un-permuted."""
    cfg, tensors, _ = load_gguf_with_metadata(path)
    return cfg, tensors
