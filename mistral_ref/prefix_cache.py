"""A prefix cache: keys and values of token sequences already run, reused by prompts that start
with the same tokens (the next turn of a chat, a shared system prompt), as mistral.rs's.

An entry is a token sequence and a KV cache of its own holding what the ring of the sequence's
cache held when it was stored: positions L - slots .. L - 1 of its L tokens (all of them unless
a sliding window wrapped the ring). A prompt matching its first m tokens can restore them when
every position a query at m still sees (the last window - 1, or all without a window) is there.
Every cache of a model maps position p to slot p % window (or p), so a restore copies slots
as they are. Entries are bounded in number and bytes; the least recently used go first.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from mistral_ref.model import KVCache, Model

DEFAULT_ENTRIES = 16  # mistral.rs's prefix_cache_n
DEFAULT_BYTES = 1 << 30


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading elements two 1-D arrays share."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


class PrefixCache:
    """Up to `max_entries` cached prefixes in at most `max_bytes` of KV memory (on the model's
    device). `stats()`: hits, misses, reused tokens, entries, bytes."""

    def __init__(self, model: Model, max_entries: int = DEFAULT_ENTRIES, max_bytes: int = DEFAULT_BYTES):
        if max_entries < 0 or max_bytes < 0:
            raise ValueError(f"need max_entries >= 0 and max_bytes >= 0, got {max_entries}, {max_bytes}")
        self.model, self.max_entries, self.max_bytes = model, max_entries, max_bytes
        self.entries: OrderedDict[int, tuple[np.ndarray, KVCache]] = OrderedDict()  # least recent first
        self._next_key = 0
        self.hits = self.misses = self.reused_tokens = 0

    def restore(self, prompt_ids: Sequence[int], cache: KVCache) -> int:
        """Into the empty `cache`, the longest cached prefix of `prompt_ids` that leaves at least
        its last token to run (its logits are needed). Returns how many positions the cache now
        holds (0: nothing matched)."""
        prompt = np.asarray(prompt_ids, dtype=np.int64)
        best, best_key = 0, None
        for key, (tokens, entry) in self.entries.items():
            m = min(common_prefix(prompt, tokens), len(prompt) - 1)
            if m > best and self._holds(entry, m):
                best, best_key = m, key
        if best_key is None:
            self.misses += 1
            return 0
        _, entry = self.entries[best_key]
        self.entries.move_to_end(best_key)
        n_slots = min(best, entry.slots)
        self.model.device.copy_slots_(cache.k, entry.k, n_slots)
        self.model.device.copy_slots_(cache.v, entry.v, n_slots)
        cache.length = best
        self.hits += 1
        self.reused_tokens += best
        return best

    def store(self, token_ids: Sequence[int], cache: KVCache) -> None:
        """Keep a copy of what `cache` holds for `token_ids` (its first cache.length tokens)."""
        tokens = np.asarray(token_ids, dtype=np.int64)
        if not self.max_entries or not len(tokens) or len(tokens) != cache.length:
            return
        for key, (cached, entry) in self.entries.items():
            if len(cached) >= len(tokens) and self._holds(entry, len(tokens)) and \
                    common_prefix(cached, tokens) == len(tokens):
                self.entries.move_to_end(key)  # an entry already serves every prompt this one would
                return
        entry = self.model.new_cache(len(tokens))
        if entry.k.nbytes * 2 > self.max_bytes:
            return
        self.model.device.copy_slots_(entry.k, cache.k, entry.slots)
        self.model.device.copy_slots_(entry.v, cache.v, entry.slots)
        entry.length = len(tokens)
        if entry.length <= entry.slots:  # it holds every position: shorter prefixes of it are redundant
            for key in [k for k, (cached, _) in self.entries.items()
                        if len(cached) <= len(tokens) and common_prefix(cached, tokens) == len(cached)]:
                del self.entries[key]
        self.entries[self._next_key] = (tokens, entry)
        self._next_key += 1
        while len(self.entries) > self.max_entries or self.nbytes() > self.max_bytes:
            self.entries.popitem(last=False)

    def nbytes(self) -> int:
        return sum(entry.k.nbytes + entry.v.nbytes for _, entry in self.entries.values())

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "reused_tokens": self.reused_tokens,
                "entries": len(self.entries), "bytes": self.nbytes()}

    @staticmethod
    def _holds(entry: KVCache, m: int) -> bool:
        """Whether `entry` still holds every position that a query at position m sees."""
        oldest_held = max(0, entry.length - entry.slots)
        oldest_seen = max(0, m - entry.window + 1) if entry.window else 0
        return oldest_seen >= oldest_held
