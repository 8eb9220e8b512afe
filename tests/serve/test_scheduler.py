"""The scheduler on its own (no model, no threads): slots in arrival order, the per-step
token budget, chunking, fairness and the standard layout's empty-batch rule."""

from __future__ import annotations

import pytest

from gpt2onnx.errors import InvalidParameterError
from gpt2onnx.serve.scheduler import Scheduler, SeqState


def seqs(owner: str, *prompts: int) -> list[SeqState]:
    return [SeqState(owner, i, n) for i, n in enumerate(prompts)]


def admit(s: Scheduler, free: list[int]) -> list[SeqState]:
    """Admit into ``free`` and, as the engine does, set each row's prompt left to run."""
    taken = s.admit(free)
    for seq in taken:
        seq.left = seq.prompt_tokens
    return taken


def step(s: Scheduler) -> list[tuple[str, int, int]]:
    """Plan and run one step; rows whose prompt is whole start decoding."""
    plan = s.plan()
    s.ran(plan)
    for seq, _ in plan.chunks:
        if seq.left == 0:
            s.started(seq)
    return [(seq.owner, seq.index, n) for seq, n in plan.chunks]


def test_rows_take_free_slots_oldest_first_and_a_big_request_starts_row_by_row() -> None:
    s = Scheduler(slots=4, chunk_tokens=32, idle_tokens=512)
    s.enqueue(seqs("big", *[5] * 6))
    s.enqueue(seqs("late", 5))
    first = admit(s, [0, 1, 2, 3])
    assert [(q.owner, q.index, q.slot) for q in first] == [("big", i, i) for i in range(4)]
    assert [q.owner for q in s.waiting] == ["big", "big", "late"]
    assert admit(s, []) == []
    step(s)  # all four prompts fit the idle budget
    s.finished(first[1])
    later = admit(s, [1])
    assert [(q.owner, q.index, q.slot) for q in later] == [("big", 4, 1)]  # not "late"


def test_idle_steps_take_the_big_budget_and_decoding_steps_one_chunk() -> None:
    s = Scheduler(slots=4, chunk_tokens=32, idle_tokens=100)
    s.enqueue(seqs("a", 70, 70))
    admit(s, [0, 1])
    assert step(s) == [("a", 0, 70), ("a", 1, 30)]  # nothing decodes: 100 tokens
    assert [q.index for q in s.running] == [0]
    plan = s.plan()  # row 0 decodes now: one chunk of at most 32
    assert [(q.index, n) for q, n in plan.chunks] == [(1, 32)]
    assert plan.decode_rows == 1 and plan.tokens == 33 and plan.budget == 33
    s.ran(plan)
    assert step(s) == [("a", 1, 8)]
    assert not s.prefilling and len(s.running) == 2


def test_a_long_prompt_is_chunked_and_never_stalls_decoding_rows_more_than_a_chunk() -> None:
    s = Scheduler(slots=16, chunk_tokens=32, idle_tokens=2048)
    s.enqueue(seqs("short", *[10] * 15))
    admit(s, list(range(15)))
    step(s)
    assert len(s.running) == 15
    s.enqueue(seqs("long", 900))
    admit(s, [15])
    steps = 0
    while s.prefilling:
        plan = s.plan()
        assert plan.prefill_tokens <= 32 and plan.decode_rows == 15
        step(s)
        steps += 1
    assert steps == 29  # ceil(900 / 32)


def test_the_oldest_prefilling_row_always_progresses_and_later_ones_share_what_is_left() -> None:
    s = Scheduler(slots=8, chunk_tokens=32, idle_tokens=32)
    s.enqueue(seqs("old", 100))
    s.enqueue(seqs("new", 4, 4))
    admit(s, [0, 1, 2])
    # The long prompt goes first every step; the short ones get only what it leaves.
    assert step(s) == [("old", 0, 32)]
    assert step(s) == [("old", 0, 32)]
    assert step(s) == [("old", 0, 32)]
    assert step(s) == [("old", 0, 4), ("new", 0, 4), ("new", 1, 4)]
    assert not s.prefilling


def test_many_short_prompts_never_starve_a_long_one() -> None:
    """A stream of small requests keeps arriving; the long prompt admitted before them
    still finishes its prefill in ceil(len / chunk) steps."""
    s = Scheduler(slots=4, chunk_tokens=16, idle_tokens=16)
    s.enqueue(seqs("long", 64))
    admit(s, [0])
    done_at = None
    for t in range(20):
        s.enqueue(seqs(f"s{t}", 3))
        for seq in admit(s, [k for k in range(1, 4)
                             if all(q.slot != k for q in s.prefilling + s.running)]):
            assert seq.slot != 0
        step(s)
        for seq in list(s.running):
            if seq.owner != "long":
                s.finished(seq)  # short rows end at once
        if done_at is None and any(q.owner == "long" for q in s.running):
            done_at = t
    assert done_at == 3


def test_rows_with_nothing_left_get_no_chunk() -> None:
    s = Scheduler(slots=2, chunk_tokens=8, idle_tokens=8)
    s.enqueue(seqs("n", 5, 5))
    _, b = admit(s, [0, 1])
    b.left = 0  # it will copy row a's slot (identical prompt)
    assert [(q.index, n) for q, n in s.plan().chunks] == [(0, 5)]


def test_standard_layout_admits_only_into_an_empty_batch_and_runs_prompts_whole() -> None:
    s = Scheduler(slots=2, chunk_tokens=4, idle_tokens=4, joinable=False)
    s.enqueue(seqs("a", 10, 12))
    s.enqueue(seqs("b", 3))
    batch = admit(s, [0, 1])
    assert [q.owner for q in batch] == ["a", "a"]
    assert admit(s, [0, 1]) == []  # the batch is not empty
    plan = s.plan()
    assert [(q.index, n) for q, n in plan.chunks] == [(0, 10), (1, 12)]  # whole, no chunks
    s.ran(plan)
    for q in batch:
        s.started(q)
    s.finished(batch[0])
    assert admit(s, [0, 1]) == []  # one row still runs
    s.finished(batch[1])
    assert [q.owner for q in admit(s, [0, 1])] == ["b"]


def test_drop_forgets_waiting_and_admitted_rows_of_one_request() -> None:
    s = Scheduler(slots=2, chunk_tokens=8, idle_tokens=8)
    s.enqueue(seqs("x", 3, 3, 3))
    s.enqueue(seqs("y", 3))
    admit(s, [0, 1])
    held = s.drop("x")
    assert sorted(q.slot for q in held) == [0, 1]
    assert [q.owner for q in s.waiting] == ["y"] and not s.prefilling
    assert s.clear() == [] and not s.waiting


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"slots": 0}, "max_batch_size"), ({"slots": 2, "chunk_tokens": 0}, "prefill_chunk"),
    ({"slots": 2, "idle_tokens": -1}, "max_step_tokens"), ({"slots": True}, "max_batch_size"),
])
def test_bad_budgets_are_refused_by_name(kwargs: dict, name: str) -> None:
    with pytest.raises(InvalidParameterError, match=name):
        Scheduler(**kwargs)


# ---- the stall budget -----------------------------------------------------------------

def test_stall_budget_fits_the_chunk_cost_and_keeps_the_ratio() -> None:
    from gpt2onnx.serve.scheduler import StallBudget

    budget = StallBudget(1.8, low=8, high=64)
    assert budget.tokens() == 64  # nothing measured: the configured chunk
    # Costs as measured for gpt2 fp32 at 15 rows: a = 14 ms, b = 0.55 ms/token, d = 27.6 ms.
    for n in (64, 32, 16, 24, 8, 40, 12):
        budget.chunk(n, 0.014 + 0.00055 * n)
        budget.decode(0.0276)
    a, b = budget.cost()  # type: ignore[misc]
    assert a == pytest.approx(0.014, rel=1e-6) and b == pytest.approx(0.00055, rel=1e-6)
    n = budget.tokens()
    assert n == int((0.8 * 0.0276 - 0.014) / 0.00055)
    assert 0.0276 + 0.014 + 0.00055 * n <= 1.8 * 0.0276  # the step stays within the ratio
    # A bigger batch (slower decode step) affords a bigger chunk, up to the cap.
    for _ in range(60):
        budget.decode(0.2)
    assert budget.tokens() == 64
    # A stall that not even one token fits in: the floor keeps prefill moving.
    for _ in range(60):
        budget.decode(0.005)
    assert budget.tokens() == 8


def test_stall_budget_with_one_chunk_size_assumes_no_fixed_cost() -> None:
    from gpt2onnx.serve.scheduler import StallBudget

    budget = StallBudget(2.0, low=4, high=32)
    budget.chunk(16, 0.016)  # 1 ms per token, as far as it can tell
    budget.decode(0.010)
    assert budget.cost() == (0.0, pytest.approx(0.001))
    assert budget.tokens() == 10


@pytest.mark.parametrize("ratio", [1.0, 0.5, -2, float("nan"), float("inf"), "2"])
def test_stall_budget_refuses_ratios_at_or_below_one(ratio: object) -> None:
    from gpt2onnx.serve.scheduler import StallBudget

    with pytest.raises(InvalidParameterError, match="max_stall"):
        StallBudget(ratio, low=4, high=32)  # type: ignore[arg-type]


def test_plan_takes_the_chunk_limit_only_while_rows_decode() -> None:
    sched = Scheduler(4, chunk_tokens=64, idle_tokens=256)
    long = SeqState("a", 0, 500, left=500)
    sched.enqueue([long])
    sched.admit([0])
    assert sched.plan(chunk_limit=10).prefill_tokens == 256  # nothing decodes: idle budget
    other = SeqState("b", 0, 5, left=5)
    sched.enqueue([other])
    sched.admit([1])
    sched.started(other)
    assert sched.plan(chunk_limit=10).prefill_tokens == 10
    assert sched.plan(chunk_limit=1000).prefill_tokens == 64  # never above the chunk


def test_while_rows_decode_a_prompt_that_fits_one_step_is_not_split() -> None:
    """Closed-loop clients come back two or three at a time: a third 13-token prompt
    that does not fit what is left of a 32-token step waits whole for the next step
    (its first token comes then either way) instead of running 6 + 7 tokens, whose
    second piece would need a model run of its own."""
    s = Scheduler(slots=8, chunk_tokens=32, idle_tokens=2048)
    s.enqueue(seqs("decoding", 4))
    admit(s, [0])
    step(s)
    assert len(s.running) == 1
    s.enqueue(seqs("burst", 13, 13, 13, 13))
    admit(s, [1, 2, 3, 4])
    assert step(s) == [("burst", 0, 13), ("burst", 1, 13)]
    assert step(s) == [("burst", 2, 13), ("burst", 3, 13)]
    assert not s.prefilling
    # The oldest prompt is still cut to the budget (it always progresses), and a prompt
    # longer than a whole step is chunked as before.
    s.enqueue(seqs("long", 40, 13))
    admit(s, [5, 6])
    assert step(s) == [("long", 0, 32)]
    assert step(s) == [("long", 0, 8), ("long", 1, 13)]
    # With nothing decoding the idle budget is used to the last token.
    idle = Scheduler(slots=4, chunk_tokens=8, idle_tokens=20)
    idle.enqueue(seqs("i", 13, 13))
    admit(idle, [0, 1])
    assert step(idle) == [("i", 0, 13), ("i", 1, 7)]


def test_with_nothing_decoding_a_later_request_gets_only_what_is_left_of_a_chunk() -> None:
    """Sixteen closed-loop clients arriving at an idle engine: the oldest request runs at
    once and later requests share one chunk per step, as if rows decoded, so the first
    client's first token does not wait for fifteen other prefills."""
    s = Scheduler(slots=16, chunk_tokens=32, idle_tokens=2048)
    for k in range(16):
        s.enqueue(seqs(f"c{k}", 11))
    admit(s, list(range(16)))
    assert step(s) == [("c0", 0, 11), ("c1", 0, 11)]  # a third would not fit 32
    assert step(s) == [("c2", 0, 11), ("c3", 0, 11)]  # two rows decode now: one chunk
    # The oldest request's own rows still share the whole idle budget (an lm-eval batch
    # of prompts is one request; its rows finish together anyway).
    batch = Scheduler(slots=16, chunk_tokens=32, idle_tokens=2048)
    batch.enqueue(seqs("lm-eval", *[100] * 16))
    batch.enqueue(seqs("later", 5))
    admit(batch, list(range(16)))
    assert step(batch) == [("lm-eval", i, 100) for i in range(16)]
    # A long prompt at an idle engine runs whole, and nothing of a later request joins it.
    long = Scheduler(slots=4, chunk_tokens=32, idle_tokens=2048)
    long.enqueue(seqs("long", 900))
    long.enqueue(seqs("short", 5))
    admit(long, [0, 1])
    assert step(long) == [("long", 0, 900)]
    assert step(long) == [("short", 0, 5)]
    # A later request whose prompt is longer than a chunk is cut to what is left of it.
    mixed = Scheduler(slots=4, chunk_tokens=32, idle_tokens=2048)
    mixed.enqueue(seqs("a", 10))
    mixed.enqueue(seqs("b", 100))
    admit(mixed, [0, 1])
    assert step(mixed) == [("a", 0, 10), ("b", 0, 22)]


def test_scoring_requests_share_the_idle_step_and_a_later_request_may_have_many_rows() -> None:
    """Rows that end at their first token (lm-eval's concurrent loglikelihood requests)
    leave nothing waiting: every request shares the idle budget, as before."""
    s = Scheduler(slots=8, chunk_tokens=32, idle_tokens=2048)
    for k in range(4):
        s.enqueue([SeqState(f"score{k}", 0, 30, decodes=False)])
    admit(s, list(range(4)))
    assert step(s) == [(f"score{k}", 0, 30) for k in range(4)]
    # A generating oldest request holds back a later request of several rows: it gets what
    # is left of the chunk, row by row, and an idle chunk_limit does not apply.
    g = Scheduler(slots=8, chunk_tokens=32, idle_tokens=2048)
    g.enqueue(seqs("gen", 10))
    g.enqueue(seqs("many", 10, 10, 10))
    admit(g, list(range(4)))
    plan = g.plan(chunk_limit=4)
    assert [(q.owner, q.index, n) for q, n in plan.chunks] == [
        ("gen", 0, 10), ("many", 0, 10), ("many", 1, 10)]
