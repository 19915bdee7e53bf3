"""Thing and shadow names, and the key that identifies one shadow in the engine's map."""

from __future__ import annotations

import re

from .errors import ShadowError

MAX_THING_NAME_LENGTH = 128
MAX_SHADOW_NAME_LENGTH = 64

# The AWS IoT API reference allows these characters; a shadow name may also contain '$'.
_THING_NAME_CHARACTERS = re.compile(r"[a-zA-Z0-9:_-]+")
_SHADOW_NAME_CHARACTERS = re.compile(r"[$a-zA-Z0-9:_-]+")

# Neither name may contain '~', so "thing~name" cannot be mistaken for a classic shadow key.
NAMED_SHADOW_SEPARATOR = "~"


def validate_thing_name(name: object) -> None:
    """Raise ShadowError 400 unless ``name`` is 1 to 128 characters of [a-zA-Z0-9:_-]."""
    _validate(name, "thing name", MAX_THING_NAME_LENGTH, _THING_NAME_CHARACTERS, "")


def validate_shadow_name(name: object) -> None:
    """Raise ShadowError 400 unless ``name`` is 1 to 64 characters of [$a-zA-Z0-9:_-]."""
    _validate(name, "shadow name", MAX_SHADOW_NAME_LENGTH, _SHADOW_NAME_CHARACTERS, "'$', ")


def shadow_key(thing_name: str, shadow_name: str | None = None) -> str:
    """Return the engine's map key: the thing name, or "thing~shadow" for a named shadow.

    The classic shadow's key is the thing name object itself, so it costs no extra string.
    """
    if not shadow_name:
        return thing_name
    return f"{thing_name}{NAMED_SHADOW_SEPARATOR}{shadow_name}"


def _validate(
    name: object, kind: str, max_length: int, characters: re.Pattern[str], extra: str
) -> None:
    if not isinstance(name, str):
        raise ShadowError(400, f"Invalid {kind} {name!r}: must be a string")
    if not name:
        raise ShadowError(400, f"Invalid {kind} '': must not be empty")
    if len(name) > max_length:
        raise ShadowError(
            400,
            f"Invalid {kind} {name!r}: {len(name)} characters, maximum is {max_length}",
        )
    if characters.fullmatch(name) is None:
        raise ShadowError(
            400,
            f"Invalid {kind} {name!r}: use only letters, digits, {extra}':', '_' and '-'",
        )
