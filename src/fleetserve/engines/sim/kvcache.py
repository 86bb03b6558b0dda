"""KV-cache block accounting with automatic prefix caching, after vLLM's block pool.

The cache is `num_blocks` blocks of `block_size` tokens. A full block of prompt tokens is named
by a hash chained over every token before it, so two prompts share a block only if they share
the whole prefix up to its end. Computed prompt blocks stay cached after their request ends
(evictable, least recently freed first) until the space is needed, as in vLLM's automatic
prefix caching; a later prompt with the same prefix skips prefill for those blocks.

Admission reserves every block a request will fill (prompt plus the tokens it will generate),
so a running request never runs out of cache and nothing is preempted. vLLM allocates blocks
as tokens arrive instead; the peak use per request is the same, the sim just commits it up
front. Usage is vLLM's definition: blocks held by running requests over all blocks.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence


def block_hashes(tokens: Sequence[Hashable], block_size: int, max_blocks: int) -> tuple[int, ...]:
    """Chained hashes of the first `max_blocks` full blocks of `tokens`."""
    hashes: list[int] = []
    parent = 0
    full = min(max_blocks, len(tokens) // block_size)
    for i in range(full):
        parent = hash((parent, tuple(tokens[i * block_size : (i + 1) * block_size])))
        hashes.append(parent)
    return tuple(hashes)


def cacheable_blocks(prompt_len: int, block_size: int) -> int:
    """Full prompt blocks that may be served from cache.

    At least one prompt token is always computed, because its forward pass yields the first
    output token; so a prompt of exactly n blocks can reuse only n - 1 of them (as in vLLM).
    """
    return max(0, (prompt_len - 1) // block_size)


class BlockPool:
    """Counts blocks; it tracks which hashes are cached, not what the blocks hold."""

    def __init__(self, num_blocks: int, *, prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.prefix_caching = prefix_caching
        self._private = 0  # blocks held by running requests outside the prefix cache
        self._pinned: dict[int, int] = {}  # cached hash -> running requests using it
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unused; LRU first

    @property
    def used_blocks(self) -> int:
        return self._private + len(self._pinned)

    @property
    def usage_frac(self) -> float:
        return self.used_blocks / self.num_blocks

    @property
    def cached_blocks(self) -> int:
        return len(self._pinned) + len(self._evictable)

    def lookup(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of `hashes` are cached."""
        if not self.prefix_caching:
            return 0
        hits = 0
        for h in hashes:
            if h not in self._pinned and h not in self._evictable:
                break
            hits += 1
        return hits

    def can_allocate(self, new_blocks: int, hit_hashes: Sequence[int]) -> bool:
        """Whether `new_blocks` fresh blocks fit while the `hit_hashes` blocks get pinned."""
        reviving = sum(1 for h in hit_hashes if h in self._evictable)
        return new_blocks + reviving <= self.num_blocks - self.used_blocks

    def allocate(self, new_blocks: int, hit_hashes: Sequence[int]) -> None:
        """Pin the cached prefix and take `new_blocks`; call only after `can_allocate`."""
        for h in hit_hashes:
            if h in self._evictable:
                del self._evictable[h]
                self._pinned[h] = 1
            else:
                self._pinned[h] += 1
        self._private += new_blocks
        overflow = self._private + self.cached_blocks - self.num_blocks
        for _ in range(max(0, overflow)):
            self._evictable.popitem(last=False)

    def promote(self, hashes: Sequence[int]) -> list[int]:
        """Turn a request's freshly computed prompt blocks into cached ones it keeps pinned.

        Returns the hashes now pinned for it (to release later). If another request computed
        the same block meanwhile, the two share it and the duplicate is freed at once.
        """
        if not self.prefix_caching:
            return []
        for h in hashes:
            self._private -= 1
            if h in self._pinned:
                self._pinned[h] += 1
            else:
                self._evictable.pop(h, None)
                self._pinned[h] = 1
        return list(hashes)

    def release(self, pinned: Sequence[int], private_blocks: int) -> None:
        """Give back a request's blocks. Its last blocks become the first to be evicted."""
        self._private -= private_blocks
        for h in reversed(pinned):
            count = self._pinned[h] - 1
            if count:
                self._pinned[h] = count
            else:
                del self._pinned[h]
                self._evictable[h] = None
