"""dovetail-jax: heterogeneous speculative decoding (Dovetail) in JAX.

Importing the package is cheap and does not start JAX; `dovetail_jax.devices` owns device setup.
"""

__version__ = "0.1.0"
