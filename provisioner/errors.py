"""Errors that are the user's to fix: they print as one clear line, never a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Something in the user's files or command line is wrong."""


class ConfigError(UserError):
    """The config file, a mapping file or a secret it refers to is wrong."""


class SourceError(UserError):
    """The identity source cannot be read as configured."""


class SafetyStop(UserError):
    """A cycle was refused because going on could deprovision accounts by mistake."""
