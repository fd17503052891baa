"""The scheduler is fair among requests: one request (a group of choices or prompts)
cannot hold the whole batch or the whole prefill budget while another waits.

Each test describes what first-come-first-served scheduling got wrong.
"""

from lmserve.backends.torch.block_manager import BlockManager
from lmserve.backends.torch.scheduler import Scheduler
from lmserve.backends.torch.sequence import Sequence, SequenceStatus
from lmserve.core.types import EngineRequest, SamplingParams

_count = iter(range(10**6))


def seq(num_prompt, max_tokens=64, group=None):
    index = next(_count)
    request = EngineRequest(f"s{index}", tuple(range(1, num_prompt + 1)), SamplingParams(max_tokens=max_tokens),
                            group_id=group)
    return Sequence(request, arrival_index=index)


def request(num_choices, num_prompt, group, max_tokens=64):
    """The sequences of one API request: ``num_choices`` choices sharing ``group``."""
    return [seq(num_prompt, max_tokens, group) for _ in range(num_choices)]


def run_step(plan, sampled_token=7):
    """Pretend the model ran: chunks computed, caught-up sequences get a token."""
    for s, n in plan.scheduled:
        s.num_computed_tokens += n
        if s.num_computed_tokens == s.num_tokens:
            s.token_ids.append(sampled_token)


def make(num_blocks=256, block_size=4, max_batch_size=8, max_prefill_token_num=64, batch_invariant=False):
    return Scheduler(BlockManager(num_blocks, block_size), max_batch_size=max_batch_size,
                     max_prefill_token_num=max_prefill_token_num, batch_invariant=batch_invariant)


def add_all(scheduler, seqs):
    for s in seqs:
        scheduler.add(s)


def rows_of(plan, seqs):
    return sum(1 for s, _ in plan.scheduled if s in seqs)


def test_choices_share_their_request_group_and_a_plain_request_is_its_own():
    a, b = request(2, 3, group="cmpl-1")
    alone = seq(3)
    assert a.group_id == b.group_id == "cmpl-1"
    assert alone.group_id == alone.request_id


def test_a_chat_is_prefilled_in_the_next_step_while_one_request_fills_the_batch():
    scheduler = make(max_batch_size=8)
    big = request(8, 4, group="big")
    add_all(scheduler, big)
    for _ in range(3):
        run_step(scheduler.schedule())
    chat = seq(4, group="chat")
    scheduler.add(chat)
    plan = scheduler.schedule()
    assert plan.scheduled == [(chat, 4)], "FCFS kept the chat waiting for a row of the full batch"
    run_step(plan)
    plan = scheduler.schedule()
    assert (chat, 1) in plan.scheduled and len(plan.scheduled) == 8 and rows_of(plan, big) == 7
    paused = next(s for s in big if s not in [r for r, _ in plan.scheduled])
    assert paused.status is SequenceStatus.RUNNING and paused.block_table, "a paused row keeps its blocks"
    assert plan.num_preempted == 0


def test_decodes_run_at_least_every_other_step_while_requests_keep_arriving():
    scheduler = make(max_batch_size=8)
    big = request(4, 4, group="big")
    add_all(scheduler, big)
    run_step(scheduler.schedule())  # the big request started alone: the next step decodes
    decoded = []
    for _ in range(6):
        scheduler.add(seq(4))  # a new chat before every step
        plan = scheduler.schedule()
        decoded.append(rows_of(plan, big) > 0)
        run_step(plan)
    assert decoded == [True, False] * 3, "steps that start sequences alone alternate with decode steps"


def test_a_paused_row_resumes_where_it_stopped_when_a_row_frees_up():
    scheduler = make(max_batch_size=4)
    big = request(4, 4, group="big")
    add_all(scheduler, big)
    run_step(scheduler.schedule())
    chat = seq(4, group="chat")
    scheduler.add(chat)
    plan = scheduler.schedule()
    paused = next(s for s in big if s not in [r for r, _ in plan.scheduled])
    computed = paused.num_computed_tokens
    run_step(plan)
    scheduler.remove(chat)  # the chat finished
    plan = scheduler.schedule()
    assert (paused, 1) in plan.scheduled and paused.num_computed_tokens == computed, "nothing was recomputed"


def test_two_big_requests_share_the_batch_equally():
    scheduler = make(max_batch_size=8)
    first, second = request(8, 4, group="first"), request(8, 4, group="second")
    add_all(scheduler, first)
    run_step(scheduler.schedule())
    add_all(scheduler, second)
    plan = scheduler.schedule()
    run_step(plan)
    plan = scheduler.schedule()
    assert rows_of(plan, first) == 4 and rows_of(plan, second) == 4, "FCFS gave the first request every row"


def test_many_small_requests_each_get_a_row_beside_a_big_one():
    scheduler = make(max_batch_size=8)
    big = request(8, 4, group="big")
    add_all(scheduler, big)
    run_step(scheduler.schedule())
    chats = [seq(4) for _ in range(3)]  # each its own request
    add_all(scheduler, chats)
    plan = scheduler.schedule()
    assert all(chat in [s for s, _ in plan.scheduled] for chat in chats)
    run_step(plan)  # the chats' prefills ran alone (the big request holds more than its share)
    plan = scheduler.schedule()
    assert all(chat in [s for s, _ in plan.scheduled] for chat in chats)
    assert rows_of(plan, big) == 5


def test_a_short_prompt_is_prefilled_in_the_next_step_beside_long_chunked_prompts():
    scheduler = make(max_prefill_token_num=64)
    long_prompts = request(6, 300, group="long")  # one completion with 6 long prompts
    add_all(scheduler, long_prompts)
    run_step(scheduler.schedule())
    short = seq(10, group="chat")
    scheduler.add(short)
    plan = scheduler.schedule()
    assert (short, 10) in plan.scheduled, "FCFS spent the whole budget on the long prompts first"
    assert sum(n for _, n in plan.scheduled) == 64, "the long prompts take the rest of the budget"


def test_the_prefill_budget_is_shared_equally_between_long_prompts():
    scheduler = make(max_prefill_token_num=64)
    first, second = seq(300, group="a"), seq(300, group="b")
    scheduler.add(first)
    run_step(scheduler.schedule())
    scheduler.add(second)
    plan = scheduler.schedule()
    assert plan.scheduled == [(first, 32), (second, 32)]


def test_batch_invariant_chunks_stay_whole_and_long_and_short_prompts_take_turns():
    scheduler = make(max_prefill_token_num=64, batch_invariant=True)
    long_prompt = seq(300, group="long")
    scheduler.add(long_prompt)
    plan = scheduler.schedule()
    assert plan.scheduled == [(long_prompt, 64)]
    run_step(plan)
    short = seq(10, group="chat")
    scheduler.add(short)
    plan = scheduler.schedule()
    assert plan.scheduled == [(short, 10)], "the short prompt goes first; the long chunk waits whole"
    run_step(plan)
    another = seq(10, group="chat2")
    scheduler.add(another)
    plan = scheduler.schedule()
    assert (long_prompt, 64) in plan.scheduled, "the chunk that waited goes first"
    assert long_prompt.num_computed_tokens % 64 == 0
    run_step(plan)
    plan = scheduler.schedule()
    assert (another, 10) in plan.scheduled


def test_memory_pressure_preempts_the_biggest_request_not_the_newest_chat():
    scheduler = make(num_blocks=10, block_size=4, max_batch_size=8)
    big = request(3, 7, group="big", max_tokens=4)  # 2 blocks each, a third at the 9th token
    add_all(scheduler, big)
    run_step(scheduler.schedule())
    chat = seq(7, max_tokens=4, group="chat")
    scheduler.add(chat)
    run_step(scheduler.schedule())  # 8 blocks taken, 8 tokens each
    plan = scheduler.schedule()  # every one needs a third block; 2 are free
    assert plan.num_preempted >= 1
    assert chat.status is SequenceStatus.RUNNING and (chat, 1) in plan.scheduled, \
        "FCFS preempted the newest sequence: the chat"
    assert any(s.status is SequenceStatus.WAITING for s in big)
