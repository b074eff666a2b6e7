"""Continuous batching on slot caches: exactness after refills, schedule invariance, replay, edge cases."""

import pytest
import torch

from qstar_cli.engine.samples import SampleRequest, StreamStats
from qstar_cli.engine.scheduler import Row, SlotScheduler
from qstar_cli.engine.slots import CAPACITY_CHUNK
from tests.helpers import assert_equals_full_forward, conversations, spread_sampler


def test_refilled_slots_equal_a_full_forward(spread_pair):
    sampler = spread_sampler(spread_pair)
    convs = conversations(14, long_every=7)
    stats = StreamStats()
    requests = [SampleRequest(i, *sampler.encode_prompts(c)) for i, c in enumerate(convs)]
    finished = list(sampler.stream(requests, slots=3, stats=stats))
    positions = [p for p, _ in finished]
    assert sorted(positions) == list(range(14)) and positions != sorted(positions), "samples finish out of order"
    lengths = [len(r.token_ids) for _, r in finished]
    assert len(set(lengths)) > 5 and min(lengths) < 10 and max(lengths) == 40
    assert stats.prefills > 4, "slots were refilled"
    assert max(len(r.prompt_ids_t) for _, r in finished) > CAPACITY_CHUNK, "a prompt grew the cache"
    for _, result in finished:
        assert_equals_full_forward(spread_pair, sampler, result)
        stops = [t in sampler.eos for t in result.token_ids]
        assert stops == [False] * (len(stops) - 1) + [result.finish_reason == "stop"]


def test_continuous_and_static_give_the_same_samples(spread_pair):
    sampler = spread_sampler(spread_pair)
    convs = conversations(12)
    continuous = sampler.generate(convs, batch_size=4, scheduler="continuous")
    static = sampler.generate(convs, batch_size=4, scheduler="static")
    alone = [sampler.generate([c], [i])[0] for i, c in enumerate(convs)]
    for a, b, c in zip(continuous, static, alone):
        assert a.token_ids == b.token_ids == c.token_ids
        assert a.finish_reason == b.finish_reason == c.finish_reason
        for name in ("alpha", "logp_q", "kl_theta"):
            assert torch.allclose(torch.tensor(a.per_token[name]), torch.tensor(b.per_token[name]), atol=1e-5)


def test_static_runs_fixed_batches_and_continuous_keeps_slots_busy(spread_pair):
    sampler = spread_sampler(spread_pair)
    convs = conversations(16)
    busy, fixed = StreamStats(), StreamStats()
    requests = [SampleRequest(i, *sampler.encode_prompts(c)) for i, c in enumerate(convs)]
    list(sampler.stream(requests, slots=4, scheduler="continuous", stats=busy))
    list(sampler.stream(requests, slots=4, scheduler="static", stats=fixed))
    assert busy.tokens == fixed.tokens
    assert fixed.prefills == 4  # one per batch of 4
    assert busy.rounds < fixed.rounds and busy.utilisation(4) > fixed.utilisation(4)


def test_replayed_samples_leave_the_others_bit_identical(spread_pair):
    """A resume replays the written samples' slots: the rest see the same batches, float for float."""
    sampler = spread_sampler(spread_pair)
    convs = conversations(12)
    requests = [SampleRequest(i, *sampler.encode_prompts(c)) for i, c in enumerate(convs)]
    full = dict(sampler.stream(requests, slots=3))
    for done in (1, 5, 9):
        replayed = [
            SampleRequest(r.sample_idx, r.prompt_ids_theta, r.prompt_ids_t, len(full[i].token_ids) if i < done else None)
            for i, r in enumerate(requests)
        ]
        resumed = dict(sampler.stream(replayed, slots=3))
        assert sorted(resumed) == list(range(done, 12))
        for i, result in resumed.items():
            assert result.token_ids == full[i].token_ids
            assert result.per_token == full[i].per_token, f"sample {i} after a resume at {done}"


def test_waiting_samples_are_bounded(spread_pair):
    sampler = spread_sampler(spread_pair)
    requests = [SampleRequest(i, *sampler.encode_prompts(c)) for i, c in enumerate(conversations(24))]
    finished: set[int] = set()
    first_unfinished = 0
    for position, _ in sampler.stream(requests, slots=4, max_waiting=6):
        finished.add(position)
        while first_unfinished in finished:
            first_unfinished += 1
        assert len(finished) - first_unfinished < 6
    assert finished == set(range(24))


@pytest.mark.parametrize("n, slots", [(1, 1), (1, 8), (3, 8), (5, 2)])
def test_few_prompts_many_slots(spread_pair, n, slots):
    sampler = spread_sampler(spread_pair)
    convs = conversations(n)
    results = sampler.generate(convs, batch_size=slots)
    assert [r.sample_idx for r in results] == list(range(n))
    for result in results:
        assert_equals_full_forward(spread_pair, sampler, result)


def test_every_row_stops_at_its_first_token(spread_pair):
    sampler = spread_sampler(spread_pair)
    sampler.eos = set(range(sampler.vocab))
    results = sampler.generate(conversations(7), batch_size=3)
    assert all(len(r.token_ids) == 1 and r.finish_reason == "stop" and r.text == "" for r in results)


def test_a_response_stops_at_the_end_of_a_models_context(spread_pair):
    sampler = spread_sampler(spread_pair, max_new_tokens=200)
    sampler.eos = set()
    convs = conversations(4)
    prompts = [sampler.encode_prompts(c) for c in convs]
    sampler.context_limits = (max(len(p) for p, _ in prompts) + 5, None)
    results = sampler.generate(convs, batch_size=2)
    for (p_theta, _), result in zip(prompts, results):
        assert len(p_theta) + len(result.token_ids) == sampler.context_limits[0]
        assert result.finish_reason == "length"


# --- The schedule alone (no model) -----------------------------------------------------------------


def schedule_of(requests, slots, scheduler="continuous", max_waiting=None):
    """A SlotScheduler whose rows are replayed samples of 5 tokens (nothing to compute)."""
    admit = lambda position, request: Row(position, request, 5, None)  # noqa: E731
    return SlotScheduler(requests, slots, scheduler, max_waiting or 32 * slots, admit)


def requests_of(rows, responses=1):
    return [SampleRequest(i, [1, 2, i], [3, i], replay_tokens=5, response_idx=k) for i in range(rows) for k in range(responses)]


@pytest.mark.parametrize(("scheduler", "refilled"), [("continuous", [4]), ("static", [])])
def test_a_freed_slot_is_refilled_only_by_the_continuous_scheduler(scheduler, refilled):
    schedule = schedule_of(requests_of(10), slots=4, scheduler=scheduler)
    schedule.place(schedule.next_group())
    assert [r.position for r in schedule.rows] == [0, 1, 2, 3] and schedule.next_group() == []
    schedule.host.produced[:4] = [10, 11, 12, 13]
    assert schedule.remove([1]) == ([3], [1])  # the last row fills the hole
    assert [r.position for r in schedule.rows] == [0, 3, 2]
    assert schedule.host.produced[:3].tolist() == [10, 13, 12], "its counts follow it"
    assert [r.position for r in schedule.next_group()] == refilled


def test_a_prompts_responses_are_admitted_together_and_waiting_is_bounded():
    schedule = schedule_of(requests_of(5, responses=3), slots=4)
    group = schedule.next_group()
    assert [(r.request.sample_idx, r.request.response_idx) for r in group] == [(0, 0), (0, 1), (0, 2)]
    schedule = schedule_of(requests_of(10), slots=4, max_waiting=2)
    assert [r.position for r in schedule.next_group()] == [0, 1]  # no further than 2 past the oldest


def test_replayed_rows_alone_jump_to_the_next_finish():
    requests = requests_of(2)
    requests[1].replay_tokens = 3
    schedule = schedule_of(requests, slots=2)
    schedule.place(schedule.next_group())
    assert schedule.replayed_only() and schedule.jump() == [1]
    assert schedule.host.produced[:2].tolist() == [3, 3]
