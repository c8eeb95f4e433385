"""The one error hierarchy of TITAN-RL: user mistakes are reported with these, never a bare traceback."""


class TitanError(Exception):
    """Base class of every error TITAN-RL raises on purpose."""


class ConfigError(TitanError, ValueError):
    """A YAML file or override names an unknown key or holds a bad value."""


class ModuleNotAllowedError(ConfigError):
    """A class path or env id read from data names a package not allowed to be imported there; `package` names it."""

    def __init__(self, message: str, package: str):
        super().__init__(message)
        self.package = package


class WireError(TitanError, ValueError):
    """A message on the wire does not decode: wrong dtype, shape or byte count."""


class ShapeMismatchError(TitanError, ValueError):
    """A record field disagrees with what the buffer stores; `field` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class BadValueError(ShapeMismatchError):
    """A field's values break the table's signature: a float that is not finite, a bool byte other than
    0 or 1, a value outside its declared bounds; `field` names it."""


class SampleTooLargeError(TitanError, ValueError):
    """A sample was asked for whose rows would not fit one message, or whose batch its table can never hold."""


class NotEnoughDataError(TitanError):
    """A sample was asked for before the buffer holds enough transitions."""


class PeerUnavailableError(TitanError):
    """Another service could not be reached within the retry budget."""


class RejectedError(TitanError):
    """Another service refused a call for good (INVALID_ARGUMENT, UNAUTHENTICATED, ...): sending it again, or
    restarting the sender, would be refused the same way."""
