"""Exceptions raised by the engine; each names the problem for the caller."""


class EngineError(Exception):
    """Base class of the engine's errors."""


class ConfigError(EngineError):
    """A model or engine configuration is invalid."""


class WeightsError(EngineError):
    """Weights cannot be found, read or mapped onto the model."""


class InvalidRequestError(EngineError):
    """A request cannot be served as given (bad prompt, bad sampling parameters)."""


class OutOfBlocksError(EngineError):
    """The block pool cannot satisfy an allocation."""


class MigrationError(EngineError):
    """A request cannot be exported or imported."""
