"""Hydra's own errors (an unknown key, bad override grammar, a missing config) as fedrac's
one-line form: what was given, what is allowed; where a key is unknown, the keys that exist."""

from __future__ import annotations

import re
from collections.abc import Sequence

GRAMMAR = "https://hydra.cc/docs/advanced/override_grammar/basic/"


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[0] if lines else type(err).__name__


def _bad_grammar(overrides: Sequence[str]) -> str | None:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for item in overrides:
        if item.startswith("-"):
            continue
        try:
            parser.parse_override(item)
        except HydraException as err:
            return (f"{item!r} is not a valid override ({_first_line(err)}); allowed: key=value, "
                    f"a sweep key=a,b, a value with spaces or brackets quoted "
                    f"('key=\"a b\"'); see {GRAMMAR}")
    return None


def _unknown_key(err: BaseException, overrides: Sequence[str]) -> str | None:
    from omegaconf import DictConfig

    cause = err.__cause__
    full_key = getattr(cause, "full_key", None)
    parent = getattr(cause, "parent_node", None)
    if not full_key or "not in" not in str(cause):
        return None
    given = next((o for o in overrides if o.lstrip("~").split("=", 1)[0] == full_key
                  or o.split("=", 1)[0].startswith(full_key + ".")), full_key)
    where = full_key.rpartition(".")[0]
    keys = sorted(str(k) for k in parent.keys()) if isinstance(parent, DictConfig) else []
    keys = [k for k in keys if where or k != "hydra"]  # the top level: the run's own keys
    scope = f"the keys of {where}" if where else "the top-level keys"
    allowed = f"{scope}: {', '.join(keys)}" if keys else "a key the config has"
    return f"{given} is not a known key; allowed: {allowed}{_hint(full_key, given, keys)}"


def _hint(full_key: str, given: str, keys: Sequence[str]) -> str:
    """``(did you mean strategy.rank?)`` for a near miss; ``(+key=value adds it)`` only for a
    key that another option of the group reads (``+strategy.client_ranks`` with fedit)."""
    import difflib

    from fedrac.settings.config import known_keys

    where, _, name = full_key.rpartition(".")
    if "=" in given and "." in full_key and name in known_keys(full_key.split(".")[0]):
        return f" (+{given.lstrip('+')} adds it)"
    close = difflib.get_close_matches(name, list(keys), n=1)
    return f" (did you mean {where + '.' if where else ''}{close[0]}?)" if close else ""


def one_line(err: BaseException, overrides: Sequence[str] = ()) -> str:
    """The one-line message for a Hydra or OmegaConf error raised while composing."""
    from hydra.errors import MissingConfigException, OverrideParseException

    if isinstance(err, OverrideParseException):
        return _bad_grammar(overrides) or f"{_first_line(err)}; see {GRAMMAR}"
    message = _unknown_key(err, overrides)
    if message:
        return message
    if isinstance(err, MissingConfigException):
        text = str(err)
        options = text.split("Available options in", 1)[1].split("Config search path", 1)[0] \
            if "Available options in" in text else ""
        names = [ln.strip() for ln in options.splitlines()[1:] if ln.strip()]
        return re.sub(r"^In '[^']*': ", "", _first_line(err)) + (
            f"; allowed: {', '.join(names)}" if names else "")
    cause = err.__cause__
    return _first_line(err) + (f" ({_first_line(cause)})" if cause else "")
