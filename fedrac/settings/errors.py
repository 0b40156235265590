"""The error a config value that cannot work raises, and the one-line check that raises it.

Below every module that checks its own keys (privacy, checkpoints, outputs, ...), so that none
of them imports the whole configuration check (:mod:`fedrac.settings.config`).
"""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A config value that cannot work; the message names key, value and what is allowed."""


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed; allowed: {allowed}")
