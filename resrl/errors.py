"""The one base class of errors a user can cause and fix (a bad config value, unusable
data, a busy run folder, a failing reward function, an unreachable tracking server).

The CLI prints them as one line, `resrl: error: ...`, without a traceback; anything
else is a bug and keeps its traceback.
"""
from __future__ import annotations


class UserError(ValueError):
    """Something the user can fix; its message says what and where."""
