"""Which KV-cache blocks each sequence owns; prefix caching by block hash.

Blocks are reference-counted: a block reached through the prefix cache can
belong to several sequences at once. A freed block without a cached hash is
handed out again first, most recently freed first, so the engine keeps
reusing memory that is already warm (on the CPU, pages are committed on first
touch). A freed block with a cached hash stays findable by its prefix until
no plain free block is left; then cached blocks are evicted least recently
used first.

The hash of a full block chains the hash of the block before it with the
block's token ids, so equal hashes mean equal prefixes.

Interactive sessions keep a finished request's blocks under a session key
(:meth:`BlockManager.keep`); the session's next request takes them back for
the longest prefix of its tokens they hold. Kept blocks are the first memory
given up when blocks run short, least recently kept first, before any running
sequence is preempted: an evicted session's next turn is computed whole.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from lmserve.backends.torch.sequence import Sequence


@dataclass
class KeptKV:
    """The blocks of a finished request, kept for its session's next request."""

    token_ids: list[int]  # the tokens whose keys/values the blocks hold, in order
    block_table: list[int]
    block_hashes: list[int]  # of the full blocks registered in the prefix cache


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self._free_plain: list[int] = list(range(num_blocks - 1, -1, -1))  # a stack: pop() is next
        self._free_cached: OrderedDict[int, None] = OrderedDict()  # LRU order
        self._hash_to_block: dict[int, int] = {}
        self._block_to_hash: dict[int, int] = {}
        #: Blocks handed out for the first time since the last :meth:`take_fresh_blocks`:
        #: their memory was never written and may hold anything (NaN included), so
        #: it is cleared before use. A reused block holds an earlier sequence's
        #: finite keys/values, which attention masks out (weight 0) untouched.
        self._fresh_blocks: list[int] = []
        self._ever_used = bytearray(num_blocks)
        self._kept: OrderedDict[str, KeptKV] = OrderedDict()  # least recently kept first

    # ------------------------------------------------------------------ queries

    @property
    def num_blocks_ever_used(self) -> int:
        """Blocks handed out at least once since start: on the CPU, the KV cache's
        memory is committed block by block as this count grows."""
        return self._ever_used.count(1)

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds (cached-but-unused blocks included)."""
        return len(self._free_plain) + len(self._free_cached)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._hash_to_block)

    @property
    def num_kept_sessions(self) -> int:
        return len(self._kept)

    def kept_tokens(self, session_key: str) -> int:
        """How many tokens' keys and values are kept under ``session_key``."""
        kept = self._kept.get(session_key)
        return len(kept.token_ids) if kept else 0

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # --------------------------------------------------------------- allocation

    def allocate(self, seq: Sequence, token_budget: int) -> int:
        """Give ``seq`` the blocks for its next chunk; return the chunk's size.

        The chunk is ``min(uncomputed tokens, token_budget)``. A sequence
        without blocks first takes its session's kept blocks, or else the
        longest cached prefix of its tokens (at least one token is always left
        to compute: its logits are needed). Kept sessions are evicted while
        blocks are short. Returns 0, changing nothing else, when there are not
        enough free blocks even then.
        """
        if not seq.block_table and seq.request.session_key in self._kept and not _wants_prompt_logprobs(seq):
            self._adopt_kept(seq)
        num_new_tokens = self._allocate(seq, token_budget)
        while not num_new_tokens and self._eviction_would_make_room(seq, token_budget):
            self._release_blocks(self._kept.popitem(last=False)[1].block_table)
            num_new_tokens = self._allocate(seq, token_budget)
        return num_new_tokens

    def _eviction_would_make_room(self, seq: Sequence, token_budget: int) -> bool:
        """Whether evicting every kept session would free enough blocks for the chunk
        (so a request that must wait anyway for running ones evicts nothing)."""
        if not self._kept or not seq.num_uncomputed_tokens:
            return False
        chunk_end = seq.num_computed_tokens + min(seq.num_uncomputed_tokens, token_budget)
        needed = self.blocks_for(chunk_end) - len(seq.block_table)
        return needed <= self.num_free_blocks + sum(len(kept.block_table) for kept in self._kept.values())

    def _allocate(self, seq: Sequence, token_budget: int) -> int:
        cached: list[int] = []
        if not seq.block_table and self.enable_prefix_caching and not _wants_prompt_logprobs(seq):
            cached = self._match_prefix(seq)
        num_computed = seq.num_computed_tokens + len(cached) * self.block_size
        num_new_tokens = min(seq.num_tokens - num_computed, token_budget)
        if num_new_tokens <= 0:
            return 0
        needed = self.blocks_for(num_computed + num_new_tokens) - len(seq.block_table) - len(cached)
        reusable_free = sum(1 for block in cached if self.ref_counts[block] == 0)
        if needed > self.num_free_blocks - reusable_free:
            return 0
        for block in cached:
            self._acquire(block)
        if cached:
            seq.block_table.extend(cached)
            seq.block_hashes.extend(self._block_to_hash[block] for block in cached)
            seq.num_computed_tokens = num_computed
            if seq.num_preemptions == 0:  # usage reports hits of the first schedule only
                seq.num_cached_tokens = min(num_computed, seq.num_prompt_tokens)
        for _ in range(needed):
            seq.block_table.append(self._take_free_block())
        return num_new_tokens

    def free(self, seq: Sequence) -> None:
        """Release every block of ``seq`` (finished, aborted or preempted)."""
        self._release_blocks(seq.block_table)
        seq.block_table.clear()
        seq.block_hashes.clear()

    # ------------------------------------------------------- interactive sessions

    def keep(self, session_key: str, seq: Sequence) -> None:
        """Keep the blocks of finished ``seq`` under ``session_key``, replacing what
        was kept there; ``seq`` is left without blocks. A sequence that computed
        nothing (aborted while waiting) leaves what was kept untouched."""
        if not seq.num_computed_tokens:
            self.free(seq)
            return
        self.release_session(session_key)
        num_blocks = self.blocks_for(seq.num_computed_tokens)
        self._release_blocks(seq.block_table[num_blocks:])  # past the computed tokens: none, as chunks are computed in the step that allocates them
        self._kept[session_key] = KeptKV(seq.token_ids[: seq.num_computed_tokens],
                                         seq.block_table[:num_blocks], list(seq.block_hashes))
        seq.block_table.clear()
        seq.block_hashes.clear()

    def release_session(self, session_key: str) -> bool:
        """Free what is kept under ``session_key``; False when nothing was."""
        kept = self._kept.pop(session_key, None)
        if kept is None:
            return False
        self._release_blocks(kept.block_table)
        return True

    def _adopt_kept(self, seq: Sequence) -> None:
        """Give ``seq`` the kept blocks of its session that hold a prefix of its tokens."""
        kept = self._kept.pop(seq.request.session_key)
        size = self.block_size
        limit = min(len(kept.token_ids), seq.num_tokens - 1)  # the last token is computed: its logits
        common = 0
        while common < limit and kept.token_ids[common] == seq.token_ids[common]:
            common += 1
        if common % size:
            # The next tokens are written into the block the common prefix ends in:
            # only a block nobody else reads may be written.
            boundary = kept.block_table[common // size]
            if self.ref_counts[boundary] > 1 or boundary in self._block_to_hash:
                common -= common % size
        num_blocks = self.blocks_for(common)
        self._release_blocks(kept.block_table[num_blocks:])
        seq.block_table = kept.block_table[:num_blocks]
        seq.block_hashes = kept.block_hashes[: common // size]
        seq.num_computed_tokens = common
        if seq.num_preemptions == 0:
            seq.num_cached_tokens = min(common, seq.num_prompt_tokens)

    def _release_blocks(self, block_table: list[int]) -> None:
        # Tail blocks first: they are the least likely to be shared, so they are evicted first.
        for block in reversed(block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] < 0:
                raise AssertionError(f"block {block} freed more often than taken")
            if self.ref_counts[block] == 0:
                if block in self._block_to_hash:
                    self._free_cached[block] = None
                else:
                    self._free_plain.append(block)

    def register_full_blocks(self, seq: Sequence) -> None:
        """Add ``seq``'s newly computed full blocks to the prefix cache; called after each step."""
        if not self.enable_prefix_caching:
            return
        size = self.block_size
        for index in range(len(seq.block_hashes), seq.num_computed_tokens // size):
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            block_hash = hash((parent, tuple(seq.token_ids[index * size : (index + 1) * size])))
            seq.block_hashes.append(block_hash)
            block = seq.block_table[index]
            if block_hash not in self._hash_to_block and block not in self._block_to_hash:
                self._hash_to_block[block_hash] = block
                self._block_to_hash[block] = block_hash

    def take_fresh_blocks(self) -> list[int]:
        """The never-used blocks handed out since the last call (the runner clears them)."""
        fresh, self._fresh_blocks = self._fresh_blocks, []
        return fresh

    # ---------------------------------------------------------------- internals

    def _match_prefix(self, seq: Sequence) -> list[int]:
        size = self.block_size
        blocks: list[int] = []
        parent = None
        for index in range((seq.num_tokens - 1) // size):
            parent = hash((parent, tuple(seq.token_ids[index * size : (index + 1) * size])))
            block = self._hash_to_block.get(parent)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def _acquire(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self._free_cached[block]  # only cached blocks are found by hash
        self.ref_counts[block] += 1

    def _take_free_block(self) -> int:
        if self._free_plain:
            block = self._free_plain.pop()
        else:  # evict the least recently used cached block
            block, _ = self._free_cached.popitem(last=False)
            del self._hash_to_block[self._block_to_hash.pop(block)]
        self.ref_counts[block] = 1
        if not self._ever_used[block]:
            self._ever_used[block] = 1
            self._fresh_blocks.append(block)
        return block


def _wants_prompt_logprobs(seq: Sequence) -> bool:
    """Such a request computes every prompt token: no prefix comes from cache."""
    return seq.sampling_params.prompt_logprobs is not None
