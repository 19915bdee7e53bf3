"""Class options for the optional mypyc build (see setup.py).

``mypyc_attr`` comes from mypy_extensions, which the build installs with mypy. The plain
package does not need it, so without it the decorator changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

_T = TypeVar("_T")

try:
    from mypy_extensions import mypyc_attr
except ImportError:  # the plain package, interpreted: the options do not apply

    def mypyc_attr(*_names: str, **_options: Any) -> Callable[[_T], _T]:  # type: ignore[misc]
        def keep(cls: _T) -> _T:
            return cls

        return keep
