"""A paged KV cache allocator (vLLM's PagedAttention) and the contiguous baseline.

A contiguous KV cache reserves ``max_len`` slots for every sequence the moment it is
admitted, because nobody knows yet how long the answer will be. A sequence that stops
after 50 of 2048 tokens wastes 97% of its reservation. PagedAttention (Kwon et al., SOSP
2023) borrows the operating system's answer: split the cache into fixed-size *blocks* of
``block_size`` token slots, give each sequence a *block table* (logical block i ->
physical block id), and allocate a new block only when the sequence's token count
crosses a block boundary. The only waste left is the unfilled tail of the last block:
internal fragmentation, fewer than ``block_size`` slots per sequence.

Attention then reads position ``pos`` through the table::

    block_id = block_table[pos // block_size]      # which physical block
    offset   = pos % block_size                    # which slot inside it

Both allocators here hand out *sequences* with the same interface (``append``, ``free``,
``allocated_slots``, ``used_slots``) and report ``allocated_slots``, ``used_slots`` and
``waste_fraction = 1 - used / allocated`` over all live sequences, so a scheduler can
use either. Running out of memory raises :class:`OutOfBlocks`, which a scheduler catches
to stop admitting or to preempt.
"""

from __future__ import annotations

import torch

__all__ = [
    "BlockAllocator",
    "ContiguousAllocator",
    "ContiguousSequence",
    "OutOfBlocks",
    "PagedSequence",
    "gather_kv",
]


class OutOfBlocks(RuntimeError):
    """The KV cache has no free block (or slot range) for this request; nothing was
    allocated.  A scheduler catches it to stop admitting or to preempt a sequence."""


def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _check_count(n_tokens) -> None:
    if not isinstance(n_tokens, int) or isinstance(n_tokens, bool) or n_tokens < 0:
        raise ValueError(
            f"n_tokens must be an int >= 0, got {n_tokens!r}; a sequence only grows"
        )


def _waste(allocated: int, used: int) -> float:
    """1 - used / allocated; 0 for an empty cache (nothing allocated or wasted)."""
    return 0.0 if allocated == 0 else 1.0 - used / allocated


# -------------------------------------------------------------------------------- paged


class BlockAllocator:
    """``num_blocks`` physical blocks of ``block_size`` token slots, handed out from a
    free list.  :meth:`sequence` starts a :class:`PagedSequence` on this pool."""

    def __init__(self, num_blocks: int, block_size: int):
        _check_positive_int("num_blocks", num_blocks)
        _check_positive_int("block_size", block_size)
        self.num_blocks, self.block_size = num_blocks, block_size
        # A stack: the block freed last is reused first (its memory is still warm).
        self._free = list(range(num_blocks - 1, -1, -1))
        self._in_use: set[int] = set()
        self.used_slots = 0  # tokens stored, kept up to date by the sequences

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def allocated_slots(self) -> int:
        return len(self._in_use) * self.block_size

    @property
    def waste_fraction(self) -> float:
        return _waste(self.allocated_slots, self.used_slots)

    def allocate(self, n_blocks: int = 1) -> list[int]:
        """Take ``n_blocks`` block ids off the free list, all or none."""
        if n_blocks > len(self._free):
            raise OutOfBlocks(
                f"need {n_blocks} blocks, {len(self._free)} free of {self.num_blocks}"
            )
        ids = [self._free.pop() for _ in range(n_blocks)]
        self._in_use.update(ids)
        return ids

    def release(self, block_ids: list[int]) -> None:
        """Return blocks to the free list; a block freed twice is a bug: it raises."""
        for b in block_ids:
            if b not in self._in_use:
                raise ValueError(f"block {b} is not allocated; was it freed twice?")
            self._in_use.remove(b)
            self._free.append(b)

    def sequence(self) -> PagedSequence:
        return PagedSequence(self)


class PagedSequence:
    """One sequence's block table on a :class:`BlockAllocator`."""

    def __init__(self, allocator: BlockAllocator):
        self.allocator = allocator
        self.block_table: list[int] = []  # logical block i -> physical block id
        self.used_slots = 0  # tokens stored

    @property
    def allocated_slots(self) -> int:
        return len(self.block_table) * self.allocator.block_size

    def append(self, n_tokens: int = 1) -> None:
        """Store ``n_tokens`` more tokens, taking a new block only when the count
        crosses a block boundary.  All or nothing: on :class:`OutOfBlocks` the
        sequence is unchanged."""
        _check_count(n_tokens)
        bs = self.allocator.block_size
        need = -(-(self.used_slots + n_tokens) // bs) - len(self.block_table)  # ceil
        if need > 0:
            self.block_table += self.allocator.allocate(need)
        self.used_slots += n_tokens
        self.allocator.used_slots += n_tokens

    def logical_to_physical(self, position: int) -> tuple[int, int]:
        """(block_id, offset) of token ``position``: attention's block-table lookup."""
        if not isinstance(position, int) or not 0 <= position < self.used_slots:
            raise ValueError(
                f"position must be an int in [0, {self.used_slots}), the "
                f"tokens stored, got {position!r}"
            )
        bs = self.allocator.block_size
        return self.block_table[position // bs], position % bs

    def free(self) -> None:
        """Give every block back; the sequence is empty afterwards."""
        self.allocator.release(self.block_table)
        self.allocator.used_slots -= self.used_slots
        self.block_table, self.used_slots = [], 0


def gather_kv(pool: torch.Tensor, block_table, length: int) -> torch.Tensor:
    """One sequence's keys (or values) in order, read through its block table.

    pool (num_blocks, block_size, ...): the physical blocks of every sequence;
    block_table: the sequence's physical block ids, logical block i -> block_table[i];
    returns (length, ...).  Token t lives in block block_table[t // block_size] at
    offset t % block_size; a paged attention kernel does this lookup per tile instead of
    materializing the gathered copy.
    """
    bs = pool.shape[1]
    if not 0 <= length <= len(block_table) * bs:
        raise ValueError(f"length must lie in [0, {len(block_table) * bs}] (the slots "
                         f"of {len(block_table)} blocks), got {length}")
    idx = torch.as_tensor(list(block_table), dtype=torch.long)
    return pool[idx].flatten(0, 1)[:length]        # (blocks·bs, ...) -> (length, ...)


# --------------------------------------------------------------------------- contiguous


class ContiguousAllocator:
    """The baseline: every sequence reserves ``max_len`` slots at admission.

    ``num_slots`` bounds the total (``None``: unbounded, the batch size is the limit).
    """

    def __init__(self, max_len: int, num_slots: int | None = None):
        _check_positive_int("max_len", max_len)
        if num_slots is not None:
            _check_positive_int("num_slots", num_slots)
        self.max_len, self.num_slots = max_len, num_slots
        self.allocated_slots = 0
        self.used_slots = 0

    @property
    def waste_fraction(self) -> float:
        return _waste(self.allocated_slots, self.used_slots)

    def sequence(self) -> ContiguousSequence:
        """Reserve ``max_len`` slots for a sequence or raise :class:`OutOfBlocks`."""
        if (
            self.num_slots is not None
            and self.allocated_slots + self.max_len > self.num_slots
        ):
            raise OutOfBlocks(
                f"need {self.max_len} slots, "
                f"{self.num_slots - self.allocated_slots} free"
            )
        self.allocated_slots += self.max_len
        return ContiguousSequence(self)


class ContiguousSequence:
    """One sequence's ``max_len``-slot reservation on a :class:`ContiguousAllocator`."""

    def __init__(self, allocator: ContiguousAllocator):
        self.allocator = allocator
        self.allocated_slots = allocator.max_len
        self.used_slots = 0

    def append(self, n_tokens: int = 1) -> None:
        _check_count(n_tokens)
        if self.used_slots + n_tokens > self.allocated_slots:
            raise ValueError(
                f"sequence would hold {self.used_slots + n_tokens} tokens, "
                f"more than max_len={self.allocated_slots}; raise max_len"
            )
        self.used_slots += n_tokens
        self.allocator.used_slots += n_tokens

    def free(self) -> None:
        self.allocator.allocated_slots -= self.allocated_slots
        self.allocator.used_slots -= self.used_slots
        self.allocated_slots, self.used_slots = 0, 0
