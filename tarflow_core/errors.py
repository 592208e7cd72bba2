"""Errors and warnings of the project, each meant to be read by a person."""


class TarflowError(Exception):
    """A problem with the user's input or setup; the command line prints it as one line."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.one_line()

    def one_line(self) -> str:
        """The message and its hint on one line (gin may append context to `str()`)."""
        if self.hint:
            return f"{self.message} (hint: {self.hint})"
        return self.message


class ConfigError(TarflowError):
    """A gin file or binding that cannot be used."""


class DataError(TarflowError):
    """A corpus that is missing, empty or not text."""


class PluginError(TarflowError):
    """A plugin that breaks the rules of the registry."""


class CheckpointError(TarflowError):
    """A checkpoint that is missing, damaged, foreign, or written by a different model."""


class NonFiniteStepsError(TarflowError):
    """Training stopped: too many steps in a row had a non-finite loss or gradient."""


class PluginHookError(TarflowError):
    """A plugin's hook raised while the framework called it."""


class UnknownComponentError(TarflowError, KeyError):
    """A component name that no plugin registered."""

    __str__ = TarflowError.__str__


class TarflowWarning(UserWarning):
    """An approximation or a degraded behaviour the user should know about."""
