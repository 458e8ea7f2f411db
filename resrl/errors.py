"""The errors a user can cause and fix (a bad config value, unusable data, a busy run
folder, a failing reward function, an unreachable tracking server).

The CLI prints any UserError as one line, `resrl: error: ...`, without a traceback;
anything else is a bug and keeps its traceback. Each module that meets such a case
raises UserError or a subclass of it (ConfigError here; DataError, RunFolderBusy,
RewardError, TrackingUnreachable beside the code that detects them).
"""
from __future__ import annotations


class UserError(ValueError):
    """Something the user can fix; its message says what and where."""


class ConfigError(UserError):
    """A configuration key or value that cannot be used."""
