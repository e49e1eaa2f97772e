"""The exceptions the KV-cache manager raises for bad input."""

from __future__ import annotations

from pagedlab.errors import BadArgument


class KVCacheError(ValueError):
    """Bad input to the KV-cache manager; the message names the offending value and the limit."""


class KVBadArgument(KVCacheError, BadArgument):
    """A constructor argument the memory manager does not allow (``order``, ``reserve``, ``place``...)."""
