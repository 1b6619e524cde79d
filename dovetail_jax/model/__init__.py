"""The target and draft models as pure functions over pytrees.

Importing it leaves JAX's configuration alone: `dovetail_jax.devices.setup()` (or `placement()`) does that.
"""
