"""Tiny random LLaMA models built with transformers, saved as HF folders and as llama.cpp-style GGUF files.

Test helpers, not tests. torch/transformers are test-only dependencies; import this module only from tests.

Public helpers (all deterministic for a given seed):

    TINY_CONFIGS: dict[str, dict]
        LlamaConfig kwargs of a few tiny shapes: "gqa_tied" (H 48, 6 heads, 2 kv), "mha_untied" (H 40, 5/5),
        "mqa_head_dim" (H 48, 4 heads of 16, 1 kv: q_size != hidden), "q8_gqa" (H 64, 4/2, every row a
        multiple of 32 so Q8_0 really quantises). Tied and untied heads, rope_theta 1e4 .. 1e6.

    tiny_model(name="gqa_tied", seed=0, **overrides) -> (LlamaForCausalLM, dict)
        A float32 eval-mode model with every weight random (norms ~1 +- 0.1, linears ~N(0, 1/fan_in),
        embeddings ~N(0, 1)), and the dovetail `ModelConfig(**kwargs)` kwargs it corresponds to (no `name`).

    make_tiny_hf(dirpath, name="gqa_tied", *, seed=0, dtype="float32", max_shard_size=None,
                 tokenizer=True, **overrides) -> (Path, LlamaForCausalLM, dict)
        `tiny_model` saved with `save_pretrained` into `dirpath` (created): config.json, safetensors
        (sharded with an index when `max_shard_size` is given, e.g. "20KB"), plus a byte-level BPE
        tokenizer.json / tokenizer_config.json (ChatML template) when `tokenizer`. The returned model is in
        `dtype` ("float32", "bfloat16" or "float16"), i.e. exactly what was saved.

    write_gguf(model, path, tensor_type="F32", *, name="tiny-llama", arch="llama", tokenizer=True,
               drop=(), replace=None) -> Path
        Write the model as llama.cpp's convert_hf_to_gguf.py would: llama metadata keys, q/k rows permuted
        for llama.cpp's RoPE, norms in F32, 2-D weights in `tensor_type` (any type `gguf.quants` can
        quantise: "F32", "F16", "BF16", "Q8_0", ...; rows not divisible by the block fall back to F16, as in
        the converter), no output.weight when tied. `drop` omits GGUF tensors by name and `replace` maps
        GGUF names to arrays written as-is, or to `(raw_bytes, ggml_type)` for pre-quantised blocks (how the
        tests reach types the `gguf` package can only dequantise, such as the K-quants).

    tiny_vocab(vocab_size) -> (tokens, token_types, merges)
        A byte-level BPE vocabulary: <|endoftext|>=0, <|im_start|>=1, <|im_end|>=2 (control), the 256
        byte tokens, a user-defined "<tool>", merges of a few English/code words, then "<unused_N>" fillers.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "gqa_tied": dict(
        vocab_size=320, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
    ),
    "mha_untied": dict(
        vocab_size=300, hidden_size=40, intermediate_size=72, num_hidden_layers=2, num_attention_heads=5,
        num_key_value_heads=5, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
    ),
    "mqa_head_dim": dict(
        vocab_size=288, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, rope_theta=1000000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
    ),
    "q8_gqa": dict(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
    ),
}
BOS_ID, EOS_ID = 1, 2
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_WORDS = ["the", "and", "def", "return", "hello", "world", "print", "self", "import", "fib", "ing", "in"]


def _byte_chars() -> list[str]:
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = [], 0
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def tiny_vocab(vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """Byte-level BPE vocabulary of exactly `vocab_size` tokens (see module docstring)."""
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *_byte_chars(), "<tool>"]
    types = [3, 3, 3, *[1] * 256, 4]
    if vocab_size < len(tokens):
        raise ValueError(f"vocab_size must be >= {len(tokens)}")
    merges: list[str] = []
    known = set(tokens)
    for word in [w for base in _WORDS for w in ("Ġ" + base, base)]:
        cur = word[0]
        for ch in word[1:]:
            if cur + ch not in known and len(tokens) < vocab_size:
                merges.append(f"{cur} {ch}")
                tokens.append(cur + ch)
                types.append(1)
                known.add(cur + ch)
            cur += ch
    while len(tokens) < vocab_size:
        tokens.append(f"<unused_{len(tokens)}>")
        types.append(1)
    return tokens, types, merges


def _hf_config(name: str, overrides: Mapping[str, Any]) -> LlamaConfig:
    kw = {**TINY_CONFIGS[name], "max_position_embeddings": 256, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID,
          **overrides}
    return LlamaConfig(**kw)


def model_config_kwargs(config: LlamaConfig) -> dict[str, Any]:
    """The dovetail ModelConfig kwargs (without `name`) of a transformers LlamaConfig."""
    rope = config.rope_parameters or {}
    return dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        rms_norm_eps=float(config.rms_norm_eps),
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=bool(config.tie_word_embeddings),
        bos_token_id=BOS_ID,
        eos_token_ids=(EOS_ID,),
    )


def tiny_model(name: str = "gqa_tied", seed: int = 0, **overrides: Any) -> tuple[LlamaForCausalLM, dict[str, Any]]:
    """Seeded float32 tiny LLaMA with all weights random (norms too, so a swapped norm is caught)."""
    config = _hf_config(name, overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if pname.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif "embed_tokens" in pname:
                p.copy_(noise)
            else:
                p.copy_(noise / p.shape[-1] ** 0.5)
    return model, model_config_kwargs(config)


def _write_tokenizer(folder: Path, vocab_size: int) -> None:
    tokens, types, merges = tiny_vocab(vocab_size)
    tk = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, [tuple(m.split(" ")) for m in merges]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    typed = list(zip(tokens, types, strict=True))
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in typed if k == 3])
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in typed if k == 4])
    tk.save(str(folder / "tokenizer.json"))
    cfg = {"bos_token": tokens[BOS_ID], "eos_token": tokens[EOS_ID], "pad_token": tokens[EOS_ID],
           "unk_token": tokens[0], "chat_template": CHATML_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1), encoding="utf-8")


def make_tiny_hf(
    dirpath: str | Path,
    name: str = "gqa_tied",
    *,
    seed: int = 0,
    dtype: str = "float32",
    max_shard_size: str | None = None,
    tokenizer: bool = True,
    **overrides: Any,
) -> tuple[Path, LlamaForCausalLM, dict[str, Any]]:
    """Save a tiny model as a HF folder (optionally sharded / bf16 / f16); see module docstring."""
    folder = Path(dirpath)
    folder.mkdir(parents=True, exist_ok=True)
    model, kwargs = tiny_model(name, seed, **overrides)
    model = model.to(getattr(torch, dtype))
    model.config.dtype = dtype
    save_kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **save_kw)
    if tokenizer:
        _write_tokenizer(folder, kwargs["vocab_size"])
    return folder, model, kwargs


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's q/k row permutation (HF rotate-half -> adjacent pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_LAYER = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
_FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "BF16": 32}


def _gguf_tensors(model: LlamaForCausalLM) -> dict[str, np.ndarray]:
    cfg = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": sd["model.embed_tokens.weight"]}
    for i in range(cfg.num_hidden_layers):
        for hf, short in _LAYER.items():
            w = sd[f"model.layers.{i}.{hf}.weight"]
            if short == "attn_q":
                w = _permute(w, cfg.num_attention_heads)
            elif short == "attn_k":
                w = _permute(w, cfg.num_key_value_heads)
            out[f"blk.{i}.{short}.weight"] = w
    out["output_norm.weight"] = sd["model.norm.weight"]
    if not cfg.tie_word_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    return out


def write_gguf(
    model: LlamaForCausalLM,
    path: str | Path,
    tensor_type: str = "F32",
    *,
    name: str = "tiny-llama",
    arch: str = "llama",
    tokenizer: bool = True,
    drop: Iterable[str] = (),
    replace: Mapping[str, np.ndarray | tuple[np.ndarray, gguf.GGMLQuantizationType]] | None = None,
) -> Path:
    """Write `model` as a llama.cpp-style GGUF file; see module docstring."""
    cfg = model.config
    path = Path(path)
    qtype = gguf.GGMLQuantizationType[tensor_type]
    w = gguf.GGUFWriter(path, arch)
    w.add_name(name)
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    if tensor_type in _FILE_TYPES:
        w.add_file_type(_FILE_TYPES[tensor_type])
    if tokenizer:
        tokens, types, merges = tiny_vocab(cfg.vocab_size)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt2")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(BOS_ID)
        w.add_eos_token_id(EOS_ID)
        w.add_unk_token_id(0)
        w.add_pad_token_id(EOS_ID)
        w.add_add_bos_token(False)
        w.add_chat_template(CHATML_TEMPLATE)

    drop = set(drop)
    replace = dict(replace or {})
    for tname, arr in _gguf_tensors(model).items():
        if tname in drop:
            continue
        if tname in replace:
            new = replace.pop(tname)
            if isinstance(new, tuple):  # (raw quantised bytes [rows, row_bytes], ggml type)
                w.add_tensor(tname, new[0], raw_dtype=new[1])
            else:
                w.add_tensor(tname, new)
            continue
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        if arr.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(tname, arr)
        elif arr.shape[-1] % block:
            w.add_tensor(tname, arr.astype(np.float16))  # the converter's fallback for rows it cannot quantise
        else:
            w.add_tensor(tname, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    for tname, arr in replace.items():  # extra tensors
        w.add_tensor(tname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
