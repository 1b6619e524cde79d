"""The simulator's errors: the library's `ConfigError` for every input it cannot use (profile, model, tree, draft,
acceptance model, sweep), so the CLI prints one line instead of a traceback under one policy everywhere."""

from __future__ import annotations

from dovetail_jax.errors import ConfigError

__all__ = ["ConfigError", "DoesNotFitError"]


class DoesNotFitError(ConfigError):
    """The schedule needs more VRAM (or host RAM) than the profile offers; comparisons report it and go on."""

