"""Discrete-event simulator of Dovetail (CPU-verify / GPU-draft speculative decoding) and its baselines.

Pure Python + numpy: only `simulator.profile` imports JAX, so sweeps run anywhere and fast. Model shapes come
from `dovetail_jax.config` (JAX-free).
"""
