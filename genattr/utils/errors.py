"""Exceptions that carry a one-sentence, user-facing explanation.

Every error a researcher can cause with bad input or a bad override derives from
``GenattrError`` so that ``launch.py`` can print the sentence instead of a deep
traceback (the traceback is still written to the job log).
"""

from __future__ import annotations


class GenattrError(Exception):
    """Base class of all user-facing errors."""


class ConfigError(GenattrError):
    """A config key or combination of options is invalid."""


class DataError(GenattrError):
    """A dataset file or folder is missing, unreadable or malformed."""
