"""The one exception the KV-cache manager raises for bad input."""

from __future__ import annotations


class KVCacheError(ValueError):
    """Bad input to the KV-cache manager; the message names the offending value and the limit."""
