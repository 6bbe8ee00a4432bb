"""Exceptions for user mistakes; importing this module needs nothing beyond the standard library."""

__all__ = ["DataError"]


class DataError(ValueError):
    """A problem with the user's data; the message names the place and the fix."""
