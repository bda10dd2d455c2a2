"""The scheduler alone: admission policy and bookkeeping against a fake backend, no model and
no thread (each test runs in milliseconds). The fake backend is a real ``StepperBackend``
whose decode state is the list of its rows' lengths, so the base class's step (and its check
of the decode state's row order) runs as it does for the real backends."""

from concurrent.futures import Future

import numpy as np
import pytest

from softprompt.runtime.backend import StepperBackend, StepPlan
from softprompt.runtime.generation import Generation
from softprompt.runtime.requests import GenerateParams, Row
from softprompt.runtime.scheduler import Scheduler, ScoreWork
from softprompt.runtime.stats import BackendStats

TOKEN = 7  # every chosen token


class _Tok:
    eos_token_ids = frozenset()

    def decode(self, ids):
        return "x" * len(ids)


class FakeBackend(StepperBackend):
    """State: one list entry per generating row (its own tokens so far)."""

    name, hidden_size, vocab_size, max_positions, fingerprint, dtype_name = ("fake", 4, 10,
                                                                             1 << 20, "f", "float32")

    def __init__(self):
        self.plans: list[StepPlan] = []

    def step(self, plan):
        self.plans.append(plan)
        return super().step(plan)

    def score(self, plan):
        return [(np.zeros(len(r.own_targets) + (r.target_start == 0)), True) for r in plan.rows]

    def prefill(self, plan, capacity):
        return [len(r.ids) for r in plan.rows], np.zeros((plan.B, self.vocab_size))

    def decode(self, state, ids):
        state[:] = [n + 1 for n in state]
        return np.zeros((len(state), self.vocab_size))

    def select(self, state, keep):
        return [state[i] for i in keep]

    def join(self, state, new):
        return (state or []) + new

    def pick(self, logits, samplers):
        return np.full(len(samplers), TOKEN), np.zeros(len(samplers)), None

    def prepare(self, prompt):
        pass

    forget = prepare

    def stats(self):
        return BackendStats()

    def save_cache(self, path):
        return 0

    load_cache = save_cache


def gen(n: int, new: int) -> Generation:
    return Generation(Row(None, [5] * n, 1), GenerateParams(max_new_tokens=new), _Tok(),
                      lambda chunk: None)


def scores(*lens: int) -> ScoreWork:
    return ScoreWork([Row(None, [5] * n, 1) for n in lens], Future())


def run(s: Scheduler, be: FakeBackend, limit: int = 100) -> int:
    """Steps until nothing is left (at most ``limit``)."""
    for n in range(limit):
        plan = s.schedule()
        if plan is None:
            return n
        s.update(plan, be.step(plan))
    raise AssertionError(f"still busy after {limit} steps")


def step_tokens(plan: StepPlan) -> int:
    return (len(plan.decode_ids) + (plan.scores.B * plan.scores.L_max if plan.scores else 0)
            + (plan.prefill.B * plan.prefill.L_max if plan.prefill else 0))


def test_budget_row_cap_and_longest_first_split():
    s, be = Scheduler(max_batch=3, max_batch_tokens=40), FakeBackend()
    gens = [gen(n, m) for n, m in [(4, 3), (6, 5), (3, 2), (5, 4), (2, 6)]]
    for g in gens[:3]:
        s.add(g)
    big, huge = scores(3, 12, 7, 9, 2, 12, 5), scores(50)  # 50 > budget: runs alone
    s.add(big)
    s.add(huge)
    for g in gens[3:]:
        s.add(g)
    run(s, be)
    for plan in be.plans:
        alone = plan.scores is not None and plan.scores.L_max == 50
        assert step_tokens(plan) <= 40 or (alone and plan.scores.B == 1 and plan.prefill is None)
        assert len(plan.decode_ids) + (plan.prefill.B if plan.prefill else 0) <= 3
        assert plan.scores is None or plan.scores.B <= 3
    lens = [n for p in be.plans if p.scores for n in p.scores.q_lens.tolist()]
    assert lens == [12, 12, 9, 7, 5, 3, 2, 50]  # the big call longest first, then the next
    assert big.future.result(0) and huge.future.result(0)
    assert [g.token_ids for g in gens] == [[TOKEN] * m for m in (3, 5, 2, 4, 6)]
    assert all(g.finish_reason == "length" for g in gens)
    assert s.requests_served == 8 + 5 and s.idle


def test_arrival_order_is_kept():
    s, be = Scheduler(max_batch=2, max_batch_tokens=1000), FakeBackend()
    works = [scores(2, 2) for _ in range(3)]
    for w in works:
        s.add(w)
    order = []
    for _ in range(3):
        plan = s.schedule()
        order.append(next(i for i, w in enumerate(works) if plan.scores.rows[0] is w.rows[0]))
        s.update(plan, be.step(plan))
    assert order == [0, 1, 2] and s.schedule() is None


def test_generations_are_not_starved_by_scores_and_scores_not_by_generations():
    s, be = Scheduler(max_batch=4, max_batch_tokens=24), FakeBackend()
    g = gen(3, 10)
    s.add(g)
    plan = s.schedule()
    s.update(plan, be.step(plan))
    flood = [scores(*[6] * 4) for _ in range(5)]  # each call alone fills the budget
    for w in flood:
        s.add(w)
    for _ in range(5):
        plan = s.schedule()
        assert len(plan.decode_ids) == 1  # the running row decodes every step
        assert plan.scores is not None  # and a score row is admitted every step
        s.update(plan, be.step(plan))
    assert len(g.token_ids) == 6 and sum(w.future.done() for w in flood) >= 1


def test_cancellation_frees_rows_and_drops_queued_work():
    s, be = Scheduler(max_batch=4, max_batch_tokens=100), FakeBackend()
    running, queued = gen(3, 10), gen(3, 10)
    s.add(running)
    plan = s.schedule()
    s.update(plan, be.step(plan))
    dropped = scores(4, 4)
    s.add(queued)
    s.add(dropped)
    queued.cancel()
    dropped.future.cancel()
    running.cancel()
    plan = s.schedule()
    assert plan.keep == [] and plan.prefill is None and plan.scores is None
    assert plan.state_ids == [] and len(plan.decode_ids) == 0
    s.update(plan, be.step(plan))
    assert running.finish_reason == "cancelled" and queued.finish_reason == "cancelled"
    assert s.idle and s.schedule() is None and s.rows_scored == 0


def test_failed_step_fails_its_requests_only():
    s, be = Scheduler(), FakeBackend()
    g, w, later = gen(3, 5), scores(3), scores(2)
    s.add(g)
    s.add(w)
    s.schedule()
    s.abort(RuntimeError("device lost\nsecond line"))
    be.reset()
    assert g.finish_reason == "error" and g.error == "RuntimeError: device lost"
    with pytest.raises(RuntimeError, match="device lost"):
        w.future.result(0)
    s.add(later)
    run(s, be)
    assert later.future.result(0)


def test_backend_refuses_a_plan_whose_row_order_differs():
    s, be = Scheduler(), FakeBackend()
    s.add(gen(3, 5))
    s.add(gen(4, 5))
    plan = s.schedule()
    s.update(plan, be.step(plan))
    plan = s.schedule()
    plan.state_ids = plan.state_ids[::-1]
    with pytest.raises(RuntimeError, match="decode state rows"):
        be.step(plan)
