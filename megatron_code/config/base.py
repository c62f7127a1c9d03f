"""What every config section shares: the error type and the choice check."""
from __future__ import annotations


class ConfigError(ValueError):
    """A config problem the user must fix; the message names the field. `field` is its dotted
    path (`model.bogus`) where the error belongs to one value, so the loader can say whether
    that value came from a file or from a command-line override."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(choices)}")

