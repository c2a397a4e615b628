"""Errors of the library: one base, `UserError`, for anything the user's input caused.

The command line (`pipeline/cli.py`) catches `UserError` and prints its message without a traceback (exit code 2);
library and stage modules raise it (or a subclass: `RecipeError`, eval's `DataError` and `BackendError`, EDoRA's
`AdapterError`) and never import the command line.
"""

from __future__ import annotations


class UserError(Exception):
    """An error caused by the user's input; printed without a traceback, exit code 2."""
