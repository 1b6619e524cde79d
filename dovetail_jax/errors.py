"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""


class DovetailError(Exception):
    """Base class of errors caused by user input (bad file, bad option), not by a bug."""


class ModelFormatError(DovetailError):
    """A model file or folder cannot be used: missing tensor, wrong shape, unsupported architecture."""


class ConfigError(DovetailError, ValueError):
    """An option or configuration value is out of range (raised by the config classes themselves, so callers
    need no translation; a ValueError too, as a bad value is one)."""


class TrainingDivergedError(DovetailError):
    """Training met a non-finite loss (or parameters): the run stops, its last good checkpoint is kept and
    nothing is exported."""
