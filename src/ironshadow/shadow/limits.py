"""Limits on shadow documents, with AWS IoT's values as defaults."""

from __future__ import annotations

from dataclasses import dataclass

# AWS IoT counts at most 8 KB of desired + reported, serialised as compact UTF-8 JSON;
# metadata does not count.
DEFAULT_MAX_STATE_BYTES = 8192
# Levels of nested non-empty objects and arrays, counting the desired or reported object as
# level 1. AWS's error text is "maximum is 6".
DEFAULT_MAX_DEPTH = 6
# AWS rejects a clientToken longer than 64 bytes.
DEFAULT_MAX_CLIENT_TOKEN_BYTES = 64


@dataclass(frozen=True, slots=True)
class ShadowLimits:
    """Limits that an update must respect; the defaults are those of AWS IoT.

    ``max_state_bytes``: bytes of compact JSON of desired plus reported after the merge.
    ``max_depth``: nesting levels of non-empty objects and arrays, desired/reported being 1.
    ``max_client_token_bytes``: UTF-8 bytes of a request's clientToken.
    """

    max_state_bytes: int = DEFAULT_MAX_STATE_BYTES
    max_depth: int = DEFAULT_MAX_DEPTH
    max_client_token_bytes: int = DEFAULT_MAX_CLIENT_TOKEN_BYTES

    def __post_init__(self) -> None:
        for name in ("max_state_bytes", "max_depth", "max_client_token_bytes"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"ShadowLimits.{name} must be a positive integer, got {value!r}")


DEFAULT_LIMITS = ShadowLimits()
