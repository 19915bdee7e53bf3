"""The optional mypyc build (see setup.py): class options, and whether it is running.

``mypyc_attr`` comes from mypy_extensions, which the build installs with mypy. The plain
package does not need it, so without it the decorator changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.machinery import EXTENSION_SUFFIXES
from typing import Any, TypeVar

_T = TypeVar("_T")

try:
    from mypy_extensions import mypyc_attr
except ImportError:  # the plain package runs interpreted, so the options do not apply

    def mypyc_attr(*_names: str, **_options: Any) -> Callable[[_T], _T]:  # type: ignore[misc]
        def keep(cls: _T) -> _T:
            return cls

        return keep


def compiled_build() -> bool:
    """Return whether this process runs the compiled build of the message path."""
    from .broker import core

    return (core.__file__ or "").endswith(tuple(EXTENSION_SUFFIXES))
