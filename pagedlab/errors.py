"""The error a part raises for a constructor argument it does not allow (plain Python, no torch)."""

from __future__ import annotations

from typing import Any


class BadArgument(ValueError):
    """``arg=value`` is not allowed; ``allowed`` says what is. The config layer prefixes the group, so the
    user reads ``allocator.order=xyz is not allowed: expected one of lifo, fifo``."""

    def __init__(self, arg: str, value: Any, allowed: str) -> None:
        self.arg, self.value, self.allowed = arg, value, allowed
        super().__init__(f"{arg}={show(value)} is not allowed: expected {allowed}")


def show(value: Any) -> str:
    """A value as the user would type it on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(show(v) for v in value) + "]"
    return str(value)


def one_of(arg: str, value: Any, allowed: tuple[str, ...] | list[str]) -> Any:
    """``value`` if it is one of ``allowed``, else BadArgument."""
    if value not in allowed:
        raise BadArgument(arg, value, "one of " + ", ".join(allowed))
    return value
