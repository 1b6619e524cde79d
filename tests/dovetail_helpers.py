"""Helpers for the Dovetail loop tests: tiny random targets and drafts built directly from numpy (no torch)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np

from dovetail_jax import devices
from dovetail_jax.config import DraftConfig, ModelConfig
from dovetail_jax.model import draft as D
from dovetail_jax.model.draft import Draft
from dovetail_jax.model.params import TargetParams, expected_shapes, params_from_tensors


def analysis_script(name: str) -> ModuleType:
    """`analysis/<name>.py` loaded as a module (a script, not a package); fresh on every call, so a test that
    edits its tables does not reach the next test."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent.parent / "analysis"
                                                  / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tiny_target(vocab: int = 64, seed: int = 0, scale: float = 0.3, layout: str = "in_out", layers: int = 2,
                tied: bool = True) -> tuple[ModelConfig, TargetParams]:
    """A random LLaMA (GQA, H 32) on the target device; `scale` sets how peaked its distributions are."""
    cfg = ModelConfig(name="tiny", vocab_size=vocab, hidden_size=32, intermediate_size=48, num_layers=layers,
                      num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=10000.0, max_position_embeddings=512,
                      tie_word_embeddings=tied)
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in expected_shapes(cfg).items():
        if len(shape) == 1:
            tensors[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            tensors[name] = (scale * rng.standard_normal(shape)).astype(np.float32)
    return cfg, params_from_tensors(cfg, tensors, devices.target_device(), layout=layout)


def random_draft(cfg: ModelConfig, params: TargetParams, dcfg: DraftConfig = DraftConfig(), seed: int = 0) -> Draft:
    import jax

    dev = devices.accelerator_device()
    p = D.init_draft(jax.random.key(seed), cfg, dcfg, dev)
    vm = None if dcfg.draft_vocab_size is None else np.arange(dcfg.draft_vocab_size)[::-1].copy()
    return Draft(dcfg, p, D.make_shared(params, cfg, vm, dev), source="random")


def self_draft(cfg: ModelConfig, params: TargetParams) -> Draft:
    """The target itself as a standalone draft: it agrees with the target almost always (long paths)."""
    dcfg, p, shared = D.draft_from_lm(params, cfg, devices.accelerator_device())
    return Draft(dcfg, p, shared, source="self", kind="self")


def hf_llama(cfg: ModelConfig, seed: int, tie: bool = False, scale: float = 0.2, max_pos: int = 256):
    """A float32 transformers LlamaForCausalLM of `cfg`'s shapes with random weights (linears N(0, scale),
    norms 1 +- 0.2), the matching config and its HF-named tensors (no lm_head when tied)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    hc = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        rope_theta=cfg.rope_theta, tie_word_embeddings=tie, max_position_embeddings=max_pos, rms_norm_eps=1e-5)
    model = transformers.LlamaForCausalLM(hc).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, scale)
            else:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    tensors = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    if tie:
        tensors.pop("lm_head.weight", None)
    return model, cfg.replace(tie_word_embeddings=tie), tensors
