"""Exceptions for user mistakes; importing this module needs nothing beyond the standard library."""

__all__ = ["DataError", "NonFiniteLossError", "UserError", "is_user_error"]


class UserError(Exception):
    """Marks an error the user can fix from its message alone (the command line prints it, exit 2)."""


class DataError(UserError, ValueError):
    """A problem with the user's data; the message names the place and the fix."""


class NonFiniteLossError(UserError, RuntimeError):
    """The loss became NaN or infinite; the message names the epoch and step."""


def is_user_error(err: BaseException) -> bool:
    """Config, data and value errors carry a message meant for the user; anything else is a bug."""
    return isinstance(err, (UserError, ValueError))
