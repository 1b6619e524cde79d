"""Discrete-event simulator of Dovetail (CPU-verify / GPU-draft speculative decoding) and its baselines.

Pure Python + numpy: only `simulator.profile` imports JAX, so sweeps run anywhere and fast. Model, draft and tree
come from `dovetail_jax.config` (JAX-free, with the library's rules and its `ConfigError`); of the library the
simulator uses only `config`, `errors`, `plan` and `stats`, never the runtime.
"""
