"""The relay's memos are bounded: memory under load stays flat once they are full.

A memo keyed by what callers send (an email, a phone number) gains an entry per new
user. Unbounded, it grows until the process restarts; large, it grows for a long time
before it levels off, which a soak reads as growth (docs/reliability.md, fifth soak).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil
from typing import Any

import app
from app.amazon import normalize


def _memoised_functions() -> list[tuple[str, Any]]:
    found = []
    for module_info in pkgutil.walk_packages(app.__path__, "app."):
        module = importlib.import_module(module_info.name)
        for name, value in vars(module).items():
            # functools' memo wrappers defined in this module (not SQLAlchemy's
            # ``func``, which answers any attribute, nor imported names twice).
            if isinstance(value, functools._lru_cache_wrapper) and (
                getattr(value, "__module__", None) == module_info.name
            ):
                found.append((f"{module_info.name}.{name}", value))
    return found


def test_no_cache_in_the_relay_grows_without_bound() -> None:
    """Every memo of the relay's code has a size limit, unless its function takes no
    argument (a constant computed once). An unbounded memo keyed by what callers send
    (an email, a phone number) would grow with every new user: in a soak, RSS then rises
    until the process is restarted."""
    functions = _memoised_functions()
    assert len(functions) > 10  # the walk found the package's memos
    for name, function in functions:
        maxsize = function.cache_info().maxsize
        if maxsize is None:
            assert not inspect.signature(function).parameters, name


def test_per_identity_caches_stay_small() -> None:
    """One entry per user seen: a few thousand keep the memory they take near a MB each
    (about 270 bytes an entry), full within a minute of load, not after twenty."""
    for function in (normalize.email_key, normalize.phone_key, normalize.phone_digits):
        maxsize = function.cache_info().maxsize
        assert maxsize is not None
        assert maxsize <= 4096
