"""The scheduler: FCFS, batch and prefill limits, chunking, preemption, rejection."""

from lmserve.backends.torch.block_manager import BlockManager
from lmserve.backends.torch.scheduler import Scheduler
from lmserve.backends.torch.sequence import Sequence, SequenceStatus
from lmserve.core.types import EngineRequest, SamplingParams

_count = iter(range(10**6))


def seq(num_prompt, max_tokens=8):
    index = next(_count)
    return Sequence(EngineRequest(f"s{index}", tuple(range(1, num_prompt + 1)), SamplingParams(max_tokens=max_tokens)),
                    arrival_index=index)


def run_step(scheduler, plan, sampled_token=7):
    """Pretend the model ran: chunks computed, caught-up sequences get a token."""
    for s, n in plan.scheduled:
        s.num_computed_tokens += n
        if s.num_computed_tokens == s.num_tokens:
            s.token_ids.append(sampled_token)


def make(num_blocks=64, block_size=4, max_batch_size=8, max_prefill_token_num=64):
    return Scheduler(BlockManager(num_blocks, block_size), max_batch_size=max_batch_size,
                     max_prefill_token_num=max_prefill_token_num)


def test_first_come_first_served_within_the_batch_limit():
    scheduler = make(max_batch_size=2)
    seqs = [seq(3) for _ in range(3)]
    for s in reversed(seqs):  # arrival order wins, not insertion order
        scheduler.add(s)
    plan = scheduler.schedule()
    assert [s for s, _ in plan.scheduled] == seqs[:2]
    assert seqs[2].status is SequenceStatus.WAITING


def test_long_prompts_are_prefilled_in_chunks_and_decodes_keep_going():
    scheduler = make(max_prefill_token_num=8)
    short, long = seq(2), seq(20)
    scheduler.add(short)
    scheduler.add(long)
    plan = scheduler.schedule()
    assert [(s, n) for s, n in plan.scheduled] == [(short, 2), (long, 6)]
    run_step(scheduler, plan)
    plan = scheduler.schedule()
    assert plan.scheduled == [(short, 1), (long, 8)], "the decode goes first and costs no prefill budget"
    run_step(scheduler, plan)
    plan = scheduler.schedule()
    assert plan.scheduled == [(short, 1), (long, 6)]


def test_preemption_frees_the_newest_and_it_recomputes_later():
    scheduler = make(num_blocks=4, block_size=4)
    old, new = seq(7, max_tokens=8), seq(7, max_tokens=8)
    scheduler.add(old)
    scheduler.add(new)
    plan = scheduler.schedule()
    assert len(plan.scheduled) == 2 and scheduler.block_manager.num_free_blocks == 0
    run_step(scheduler, plan)
    run_step(scheduler, scheduler.schedule())  # both now hold 8 tokens in 2 blocks; the 9th needs a block
    plan = scheduler.schedule()
    assert plan.num_preempted == 1 and scheduler.num_preemptions == 1
    assert [s for s, _ in plan.scheduled] == [old]
    assert new.status is SequenceStatus.WAITING and new.num_computed_tokens == 0 and new.block_table == []
    assert new.num_tokens == 9, "its generated tokens are kept and recomputed"
    scheduler.remove(old)
    plan = scheduler.schedule()
    assert plan.scheduled == [(new, 9)]


def test_a_request_that_can_never_fit_is_rejected_not_queued_forever():
    scheduler = make(num_blocks=4, block_size=4)
    too_big = seq(10, max_tokens=10)  # 20 tokens > 16 in the whole cache
    fine = seq(3)
    scheduler.add(too_big)
    scheduler.add(fine)
    plan = scheduler.schedule()
    assert [s for s, _ in plan.rejected] == [too_big]
    assert "cache holds only 4 blocks" in plan.rejected[0][1]
    assert [s for s, _ in plan.scheduled] == [fine]
