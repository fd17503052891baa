"""Invariants of the block manager: ref counts, no double free, prefix hits, eviction."""

import pytest

from lmserve.backends.torch.block_manager import BlockManager
from lmserve.backends.torch.sequence import Sequence
from lmserve.core.types import EngineRequest, SamplingParams

_count = iter(range(10**6))


def seq(tokens, max_tokens=8):
    return Sequence(EngineRequest(f"s{next(_count)}", tuple(tokens), SamplingParams(max_tokens=max_tokens)),
                    arrival_index=next(_count))


def compute(manager, s, n):
    """What the engine does after a step: the chunk is computed."""
    s.num_computed_tokens += n
    manager.register_full_blocks(s)


def test_allocate_and_free_return_every_block():
    manager = BlockManager(8, 4)
    a, b = seq(range(10)), seq(range(5))
    assert manager.allocate(a, 100) == 10 and len(a.block_table) == 3
    assert manager.allocate(b, 100) == 5 and len(b.block_table) == 2
    assert manager.num_free_blocks == 3
    assert len(set(a.block_table) | set(b.block_table)) == 5, "no block is handed out twice"
    manager.free(a)
    manager.free(b)
    assert manager.num_free_blocks == 8 and set(manager.ref_counts) == {0}


def test_a_failed_allocation_changes_nothing():
    manager = BlockManager(2, 4)
    s = seq(range(12))
    assert manager.allocate(s, 100) == 0
    assert s.block_table == [] and manager.num_free_blocks == 2 and s.num_computed_tokens == 0


def test_freeing_a_block_twice_is_caught():
    manager = BlockManager(4, 4)
    s = seq(range(4))
    manager.allocate(s, 100)
    table = list(s.block_table)
    manager.free(s)
    s.block_table.extend(table)  # a bug that frees the same blocks again
    with pytest.raises(AssertionError, match="freed more often"):
        manager.free(s)


def test_chunks_grow_the_table_only_as_needed():
    manager = BlockManager(8, 4)
    s = seq(range(10))
    assert manager.allocate(s, 3) == 3 and len(s.block_table) == 1
    compute(manager, s, 3)
    assert manager.allocate(s, 3) == 3 and len(s.block_table) == 2
    compute(manager, s, 3)
    assert manager.allocate(s, 100) == 4 and len(s.block_table) == 3


def test_prefix_hits_share_blocks_and_count_references():
    manager = BlockManager(16, 4, enable_prefix_caching=True)
    prompt = list(range(100, 110))  # two full blocks + 2 tokens
    first = seq(prompt)
    compute(manager, first, manager.allocate(first, 100))
    second = seq(prompt + [7, 8, 9])
    n = manager.allocate(second, 100)
    assert second.num_computed_tokens == 8 and second.num_cached_tokens == 8
    assert n == 5
    assert second.block_table[:2] == first.block_table[:2]
    assert [manager.ref_counts[b] for b in first.block_table[:2]] == [2, 2]
    manager.free(first)
    assert [manager.ref_counts[b] for b in second.block_table[:2]] == [1, 1]
    manager.free(second)
    assert manager.num_free_blocks == 16 and set(manager.ref_counts) == {0}


def test_a_fully_cached_prompt_still_computes_its_last_token():
    manager = BlockManager(16, 4, enable_prefix_caching=True)
    prompt = list(range(8))  # exactly two blocks
    first = seq(prompt)
    compute(manager, first, manager.allocate(first, 100))
    manager.free(first)
    again = seq(prompt)
    assert manager.allocate(again, 100) == 4  # one block reused, the last recomputed
    assert again.num_cached_tokens == 4


def test_freed_cached_blocks_are_found_again_until_evicted():
    manager = BlockManager(4, 4, enable_prefix_caching=True)
    cached = seq(list(range(50, 59)))  # 2 full blocks + 1
    compute(manager, cached, manager.allocate(cached, 100))
    manager.free(cached)
    assert manager.num_free_blocks == 4 and manager.num_cached_blocks == 2
    hit = seq(list(range(50, 59)))
    manager.allocate(hit, 100)
    assert hit.num_cached_tokens == 8
    manager.free(hit)
    # Plain free blocks go first; then cached ones are evicted (LRU) and forgotten.
    big = seq(list(range(200, 216)))
    assert manager.allocate(big, 100) == 16
    assert manager.num_cached_blocks == 0
    manager.free(big)
    miss = seq(list(range(50, 59)))
    manager.allocate(miss, 100)
    assert miss.num_cached_tokens == 0


def test_different_prefixes_do_not_match():
    manager = BlockManager(16, 4, enable_prefix_caching=True)
    a = seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    compute(manager, a, manager.allocate(a, 100))
    b = seq([1, 2, 3, 4, 0, 6, 7, 8, 9])  # same first block, different second
    manager.allocate(b, 100)
    assert b.num_cached_tokens == 4
    assert b.block_table[0] == a.block_table[0] and b.block_table[1] != a.block_table[1]


def test_only_never_used_blocks_are_handed_out_for_clearing():
    manager = BlockManager(4, 4)
    a = seq(range(6))
    manager.allocate(a, 100)
    first = manager.take_fresh_blocks()
    assert sorted(first) == sorted(a.block_table) and manager.take_fresh_blocks() == []
    manager.free(a)
    b = seq(range(14))  # reuses a's two blocks, then needs two never-used ones
    manager.allocate(b, 100)
    fresh = manager.take_fresh_blocks()
    assert len(fresh) == 2 and not set(fresh) & set(first)
    assert set(fresh) | set(first) == set(b.block_table)


# ------------------------------------------------------------ interactive sessions


def session_seq(tokens, key="chat-1", keep=True):
    return Sequence(EngineRequest(f"s{next(_count)}", tuple(tokens), SamplingParams(max_tokens=8),
                                  session_key=key, keep_kv=keep), arrival_index=next(_count))


def finish_turn(manager, s, key="chat-1"):
    """Compute all but the last token (the engine never computes the last sampled one), then keep."""
    n = manager.allocate(s, 100)
    compute(manager, s, n)
    manager.keep(key, s)


def test_a_kept_session_holds_its_blocks_until_released():
    manager = BlockManager(8, 4)
    first = session_seq(range(10))
    finish_turn(manager, first)
    assert first.block_table == [] and manager.num_kept_sessions == 1
    assert manager.kept_tokens("chat-1") == 10 and manager.num_free_blocks == 5
    assert manager.release_session("chat-1") and not manager.release_session("chat-1")
    assert manager.num_free_blocks == 8 and set(manager.ref_counts) == {0}


def test_the_next_turn_reuses_the_kept_prefix_and_computes_only_the_rest():
    manager = BlockManager(8, 4)
    first = session_seq(range(10))
    finish_turn(manager, first)
    kept_blocks = list(manager._kept["chat-1"].block_table)
    second = session_seq([*range(10), 50, 51, 52])
    assert manager.allocate(second, 100) == 3, "only the new turn is computed"
    assert second.num_computed_tokens == 10 and second.num_cached_tokens == 10
    assert second.block_table[:3] == kept_blocks, "the partly filled third block is written on"
    assert manager.num_kept_sessions == 0
    manager.free(second)
    assert manager.num_free_blocks == 8 and set(manager.ref_counts) == {0}


def test_only_the_common_prefix_is_reused_and_the_blocks_past_it_are_freed():
    manager = BlockManager(8, 4)
    finish_turn(manager, session_seq(range(12)))
    assert manager.num_free_blocks == 5
    diverging = session_seq([0, 1, 2, 3, 4, 99, 98])  # shares 5 tokens
    assert manager.allocate(diverging, 100) == 2
    assert diverging.num_computed_tokens == 5 and len(diverging.block_table) == 2
    assert manager.num_free_blocks == 6
    manager.free(diverging)
    assert manager.num_free_blocks == 8


def test_a_prompt_equal_to_the_kept_tokens_still_computes_its_last_token():
    manager = BlockManager(8, 4)
    finish_turn(manager, session_seq(range(8)))
    again = session_seq(range(8))
    assert manager.allocate(again, 100) == 1 and again.num_computed_tokens == 7


def test_a_shared_block_is_never_written_into_the_prefix_is_cut_at_its_start():
    manager = BlockManager(8, 4, enable_prefix_caching=True)
    finish_turn(manager, session_seq(range(10)))  # blocks 0-3 and 4-7 are full and registered
    other = seq([*range(8), 70, 71])
    manager.allocate(other, 100)  # shares the two full blocks through the prefix cache
    diverging = session_seq([0, 1, 2, 3, 4, 5, 60, 61])  # diverges inside the second (shared) block
    assert manager.allocate(diverging, 100) == 4
    assert diverging.num_computed_tokens == 4, "the shared block is not adopted for writing"
    assert diverging.block_table[1] not in other.block_table


def test_blocks_short_evict_kept_sessions_least_recently_kept_first_before_failing():
    manager = BlockManager(6, 4)
    finish_turn(manager, session_seq(range(8), key="old"), key="old")
    finish_turn(manager, session_seq(range(8), key="new"), key="new")
    assert manager.num_free_blocks == 2
    big = seq(range(12))
    assert manager.allocate(big, 100) == 12
    assert manager.num_kept_sessions == 1 and manager.kept_tokens("new") == 8, "the older session went first"
    huge = seq(range(40))  # cannot fit even with every kept session evicted
    assert manager.allocate(huge, 100) == 0 and manager.num_kept_sessions == 1, "nothing evicted in vain"


def test_an_evicted_session_computes_its_whole_prompt_again():
    manager = BlockManager(4, 4)
    finish_turn(manager, session_seq(range(8)))
    big = seq(range(12))
    manager.allocate(big, 100)  # needs 3 of 4 blocks: the session is evicted
    assert manager.num_kept_sessions == 0
    manager.free(big)
    turn = session_seq([*range(8), 9])
    assert manager.allocate(turn, 100) == 9 and turn.num_computed_tokens == 0


def test_keeping_replaces_what_the_session_kept_before():
    manager = BlockManager(8, 4)
    finish_turn(manager, session_seq(range(6)))
    second = session_seq([*range(6), 7, 8])
    finish_turn(manager, second)
    assert manager.num_kept_sessions == 1 and manager.kept_tokens("chat-1") == 8
    manager.release_session("chat-1")
    assert manager.num_free_blocks == 8 and set(manager.ref_counts) == {0}


def test_a_turn_that_computed_nothing_leaves_the_kept_blocks_alone():
    manager = BlockManager(8, 4)
    finish_turn(manager, session_seq(range(6)))
    never_ran = session_seq([*range(6), 7])
    manager.keep("chat-1", never_ran)  # aborted while waiting
    assert manager.kept_tokens("chat-1") == 6
