"""The simulator's user-input error, so the CLI can print one line instead of a traceback."""

from __future__ import annotations

from dovetail_jax.errors import DovetailError


class SimulatorInputError(DovetailError):
    """A profile, model, acceptance model or sweep the simulator cannot use, with the reason in one sentence."""


class DoesNotFitError(SimulatorInputError):
    """The schedule needs more VRAM (or host RAM) than the profile offers."""
