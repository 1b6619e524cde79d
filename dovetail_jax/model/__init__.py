"""The target model as pure functions over pytrees.

Importing it configures JAX's devices first (two host devices when there is no GPU), which must happen
before the JAX backend starts.
"""

from dovetail_jax import devices as _devices  # noqa: F401
