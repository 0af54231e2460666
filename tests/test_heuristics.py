"""Each heuristic makes the decision its definition says, on tiny hand-built states; policy files
round-trip; bad names and knobs give one clear PolicyError."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

import pytest

from envs.sim.view import CallView, ClusterView, EngineView
from heuristics import registry
from heuristics.dispatch import LeastOutstandingRequests, LeastWork, RandomDispatch, RoundRobin, WeightedScoring, WorkloadBalanced
from heuristics.local import FCFS, EarliestDeadlineFirst, Urgency
from policies import PolicyError, load_policy, policy_from_spec, save_policy
from policies.heuristic import HeuristicPolicy


@dataclass
class FakeCall:
    step: str = "gen"
    ready_time_s: float = 0.0
    deadline_s: float = 100.0
    workflow_deadline_s: float = 200.0
    call_id: int = 0
    workflow_id: int = 0
    tenant: str = "default"
    stage_index: int = 0
    fanout: int = 1
    input_tokens: int = 1000
    output_tokens: int = 100
    priority: int = 0
    segments: tuple = ()


@dataclass
class FakeEngine:
    latency_s: dict[str, float]
    engine_id: int = 0
    name: str = "e"
    gpu: str = "X"
    healthy: bool = True
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    outstanding_work_s: float = 0.0
    assigned_work_s: float = 0.0
    assigned_calls: int = 0
    price_per_hour: float = 1.0
    max_num_seqs: int = 256
    kv_capacity_tokens: int = 1 << 20

    prefix_cache_tokens: int = 0

    def expected_latency_s(self, step: str) -> float:
        return self.latency_s[step]

    def cached_prefix_tokens(self, call) -> int:
        return 0

    def expected_call_latency_s(self, call) -> float:
        return self.latency_s[call.step]


@dataclass
class FakeCluster:
    engines: list[FakeEngine]
    now_s: float = 0.0
    recent_arrival_rate_qps: float = 0.0
    slo_attainment_so_far: float = 1.0
    workflows: list = field(default_factory=list)
    finished_workflows: int = 0
    met_workflows: int = 0
    _workflows: dict = field(default_factory=dict)

    def workflow(self, workflow_id: int):
        return self._workflows[workflow_id]


def cluster(*engines: FakeEngine) -> FakeCluster:
    for i, e in enumerate(engines):
        e.engine_id = i
    return FakeCluster(list(engines))


def test_fakes_satisfy_the_protocols():
    e = FakeEngine({"gen": 1.0})
    assert isinstance(FakeCall(), CallView)
    assert isinstance(e, EngineView)
    assert isinstance(cluster(e), ClusterView)


def test_round_robin_cycles_and_skips_unhealthy():
    c = cluster(FakeEngine({"gen": 1}), FakeEngine({"gen": 1}, healthy=False), FakeEngine({"gen": 1}))
    d = RoundRobin()
    assert [d.dispatch(FakeCall(), c) for _ in range(4)] == [0, 2, 0, 2]
    d.reset()
    assert d.dispatch(FakeCall(), c) == 0


def test_random_is_seeded_uniform_over_healthy():
    c = cluster(*[FakeEngine({"gen": 1}, healthy=(i != 2)) for i in range(4)])
    a, b = RandomDispatch(seed=3), RandomDispatch(seed=3)
    picks = [a.dispatch(FakeCall(), c) for _ in range(300)]
    assert picks == [b.dispatch(FakeCall(), c) for _ in range(300)]
    assert set(picks) == {0, 1, 3}
    a.reset()
    assert [a.dispatch(FakeCall(), c) for _ in range(300)] == picks


def test_least_outstanding_requests_counts_running_plus_waiting():
    c = cluster(FakeEngine({"gen": 1}, num_running=3, num_waiting=1),
                FakeEngine({"gen": 9}, num_running=1, num_waiting=2),
                FakeEngine({"gen": 1}, num_running=0, num_waiting=0, healthy=False),
                FakeEngine({"gen": 1}, num_running=2, num_waiting=1))
    assert LeastOutstandingRequests().dispatch(FakeCall(), c) == 1  # 3 < 4, ties -> lowest index; down engine skipped


def test_least_work_is_earliest_expected_finish():
    fast_busy = FakeEngine({"gen": 2.0}, outstanding_work_s=10.0)  # finishes at 12
    slow_idle = FakeEngine({"gen": 8.0}, outstanding_work_s=0.0)  # finishes at 8
    assert LeastWork().dispatch(FakeCall(), cluster(fast_busy, slow_idle)) == 1
    fast_busy.outstanding_work_s = 5.0  # now 7 < 8
    assert LeastWork().dispatch(FakeCall(), cluster(fast_busy, slow_idle)) == 0


def test_least_work_backlog_weight_discounts_a_batching_engine_backlog():
    """At weight 0.25 a backlog of 20 solo seconds counts as 5: the fast engine (5 + 2 = 7) beats
    the idle slow one (8), which plain earliest finish (20 + 2 = 22) picks."""
    fast_busy = FakeEngine({"gen": 2.0}, outstanding_work_s=20.0)
    slow_idle = FakeEngine({"gen": 8.0}, outstanding_work_s=0.0)
    assert LeastWork().dispatch(FakeCall(), cluster(fast_busy, slow_idle)) == 1
    assert LeastWork(backlog_weight=0.25).dispatch(FakeCall(), cluster(fast_busy, slow_idle)) == 0
    fast_busy.outstanding_work_s = 28.0  # 7 + 2 = 9 > 8: the slow engine again
    assert LeastWork(backlog_weight=0.25).dispatch(FakeCall(), cluster(fast_busy, slow_idle)) == 1
    assert LeastWork(backlog_weight=0.5).get_knobs() == {"backlog_weight": 0.5, "queue_weight": 0.0, "kv_weight": 0.0}
    for bad in (-0.1, float("inf"), "x", True):
        with pytest.raises(ValueError, match="backlog_weight"):
            LeastWork(backlog_weight=bad)


def test_least_work_queue_and_kv_weights_steer_away_from_a_full_engine():
    """Two equally fast engines with equal (discounted) backlog: the one whose batch is full
    (calls waiting) or whose KV cache is nearly full costs more once those weights are set."""
    full = FakeEngine({"gen": 4.0}, outstanding_work_s=10.0, num_waiting=3, kv_usage=0.9)
    free = FakeEngine({"gen": 4.0}, outstanding_work_s=12.0, num_waiting=0, kv_usage=0.1)
    assert LeastWork().dispatch(FakeCall(), cluster(full, free)) == 0  # 10 + 4 < 12 + 4
    assert LeastWork(queue_weight=0.5).dispatch(FakeCall(), cluster(full, free)) == 1  # 10 + 4 x 2.5 = 20 > 16
    assert LeastWork(kv_weight=1.0).dispatch(FakeCall(), cluster(full, free)) == 1  # 10 + 4 x 1.9 = 17.6 > 16.4
    # the expected finish it minimises, spelled out
    lw = LeastWork(backlog_weight=0.1, queue_weight=0.5, kv_weight=2.0)
    costs = [0.1 * e.outstanding_work_s + 4.0 * (1 + 0.5 * e.num_waiting + 2.0 * e.kv_usage) for e in (full, free)]
    assert lw.dispatch(FakeCall(), cluster(full, free)) == costs.index(min(costs))
    for knob in ("queue_weight", "kv_weight"):
        with pytest.raises(ValueError, match=knob):
            LeastWork(**{knob: -1.0})


def test_weighted_scoring_queue_and_kv():
    # queue scores (min-max): e0 q=4 -> 0, e1 q=0 -> 1, e2 q=2 -> 0.5; kv: 1 - usage
    c = cluster(FakeEngine({"gen": 1}, num_waiting=4, kv_usage=0.0),  # 2*0 + 2*1 = 2
                FakeEngine({"gen": 1}, num_waiting=0, kv_usage=0.9),  # 2*1 + 2*0.1 = 2.2
                FakeEngine({"gen": 1}, num_waiting=2, kv_usage=0.2))  # 2*0.5 + 2*0.8 = 2.6
    assert WeightedScoring().dispatch(FakeCall(), c) == 2
    assert WeightedScoring(queue_weight=10, kv_weight=0).dispatch(FakeCall(), c) == 1
    assert WeightedScoring(queue_weight=0, kv_weight=1).dispatch(FakeCall(), c) == 0


def test_weighted_scoring_ties_are_random_but_seeded():
    c = cluster(*[FakeEngine({"gen": 1}) for _ in range(4)])
    picks = [WeightedScoring(seed=1).dispatch(FakeCall(), c) for _ in range(1)]
    d = WeightedScoring(seed=1)
    many = {d.dispatch(FakeCall(), c) for _ in range(100)}
    assert many == {0, 1, 2, 3} and picks[0] in many


def _wb_cluster() -> FakeCluster:
    # base engine: e0 (fastest for "gen"); T_base = 10
    return cluster(FakeEngine({"gen": 10.0}, assigned_work_s=100.0, outstanding_work_s=0.0),
                   FakeEngine({"gen": 20.0}, assigned_work_s=20.0, outstanding_work_s=40.0),
                   FakeEngine({"gen": 12.5}, assigned_work_s=60.0, outstanding_work_s=5.0))


def test_workload_balanced_formula():
    c = _wb_cluster()
    call = FakeCall()
    # score = a * 10/T_e - (1-a) * W_e/100
    for alpha in (0.0, 0.2, 0.5, 0.8, 1.0):
        expected = [alpha * 10 / t - (1 - alpha) * w / 100 for t, w in ((10, 100), (20, 20), (12.5, 60))]
        d = WorkloadBalanced(alpha=alpha)
        assert d.scores(call, c) == pytest.approx(dict(enumerate(expected)))
        assert d.dispatch(call, c) == max(range(3), key=lambda i: (expected[i], -i))
    assert WorkloadBalanced(alpha=1.0).dispatch(call, c) == 0  # all speed: the fastest engine
    assert WorkloadBalanced(alpha=0.0).dispatch(call, c) == 1  # all balance: least cumulative work


def test_workload_balanced_outstanding_variant_uses_unfinished_work():
    c = _wb_cluster()
    # outstanding W: base has 0 -> W_base floored at T_base = 10; least outstanding = e0
    assert WorkloadBalanced(alpha=0.0, work="outstanding").dispatch(FakeCall(), c) == 0
    scores = WorkloadBalanced(alpha=0.5, work="outstanding").scores(FakeCall(), c)
    assert scores[1] == pytest.approx(0.5 * 10 / 20 - 0.5 * 40 / 10)


def test_workload_balanced_base_is_fastest_healthy_engine():
    c = _wb_cluster()
    c.engines[0].healthy = False  # base becomes e2 (T=12.5, W=60)
    d = WorkloadBalanced(alpha=0.5)
    scores = d.scores(FakeCall(), c)
    assert set(scores) == {1, 2}
    assert scores[2] == pytest.approx(0.5 * 1.0 - 0.5 * 1.0)
    assert scores[1] == pytest.approx(0.5 * 12.5 / 20 - 0.5 * 20 / 60)
    assert d.dispatch(FakeCall(), c) == 1


@pytest.mark.parametrize("name", ["round-robin", "random", "least-outstanding", "least-work", "weighted-scoring",
                                  "workload-balanced"])
def test_dispatchers_never_choose_unhealthy_engines(name):
    rng = random.Random(7)
    for work in ("assigned", "outstanding"):
        d = registry.DISPATCHERS[name](**({"work": work} if name == "workload-balanced" else {}))
        for _ in range(200):
            engines = [FakeEngine({"gen": rng.uniform(1, 20)}, healthy=rng.random() < 0.5, num_running=rng.randrange(5),
                                  num_waiting=rng.randrange(5), kv_usage=rng.random(),
                                  outstanding_work_s=rng.uniform(0, 50), assigned_work_s=rng.uniform(0, 500))
                       for _ in range(rng.randrange(1, 7))]
            engines[rng.randrange(len(engines))].healthy = True
            c = cluster(*engines)
            assert c.engines[d.dispatch(FakeCall(), c)].healthy


def test_local_orders():
    fast = FakeEngine({"gen": 2.0, "short": 0.5})
    a = FakeCall(step="gen", ready_time_s=0.0, deadline_s=30.0)  # slack key 28
    b = FakeCall(step="short", ready_time_s=5.0, deadline_s=20.0)  # slack key 19.5
    c = FakeCall(step="gen", ready_time_s=1.0, deadline_s=21.0)  # slack key 19.0
    order = lambda lo: [x for _, x in sorted(((lo.key(x, fast), i), x) for i, x in enumerate((a, b, c)))]
    assert order(FCFS()) == [a, c, b]
    assert order(EarliestDeadlineFirst()) == [b, c, a]
    assert order(Urgency()) == [c, b, a]  # least slack first: deadline - T_e(s)
    assert order(Urgency(weight=0.0)) == order(FCFS())
    u = Urgency(weight=0.25)
    assert u.key(a, fast) == pytest.approx(0.25 * 28.0 + 0.75 * 0.0)


def test_triage_queues_hopeless_calls_behind_savable_ones():
    """A call that misses its deadline even if admitted when ready goes last; the rest keep the
    urgency order; with no hopeless call, triage is exactly urgency."""
    from heuristics.local import UrgencyTriage

    e = FakeEngine({"gen": 2.0})
    hopeless = FakeCall(step="gen", ready_time_s=10.0, deadline_s=11.0)  # needs 2 s, has 1 s
    savable_late = FakeCall(step="gen", ready_time_s=0.0, deadline_s=40.0)
    savable_soon = FakeCall(step="gen", ready_time_s=5.0, deadline_s=20.0)
    order = lambda lo, calls: sorted(calls, key=lambda x: lo.key(x, e))
    assert order(Urgency(), [hopeless, savable_late, savable_soon])[0] is hopeless  # pure urgency: worst first
    assert order(UrgencyTriage(), [hopeless, savable_late, savable_soon]) == [savable_soon, savable_late, hopeless]
    assert [UrgencyTriage(0.4).key(x, e) for x in (savable_late, savable_soon)] == \
        [Urgency(0.4).key(x, e) for x in (savable_late, savable_soon)]
    # a margin gives up earlier: 3 s of slice for a 2 s call is savable alone, not at margin 2
    tight = FakeCall(step="gen", ready_time_s=5.0, deadline_s=8.0)
    assert order(UrgencyTriage(), [tight, savable_late])[0] is tight
    assert order(UrgencyTriage(margin=2.0), [tight, savable_late]) == [savable_late, tight]
    with pytest.raises(ValueError, match="margin"):
        UrgencyTriage(margin=-1.0)


def test_workflow_first_orders_by_workflow_deadline_and_gives_up_on_hopeless_calls():
    """Calls of the workflow due first go first, whatever their own slice or readiness; a call
    whose slice is under margin x T_e(s) goes behind every savable one."""
    from heuristics.local import WorkflowFirst

    e = FakeEngine({"gen": 2.0})
    old_wf_late_step = FakeCall(step="gen", ready_time_s=50.0, deadline_s=90.0, workflow_deadline_s=100.0)
    new_wf_first_step = FakeCall(step="gen", ready_time_s=0.0, deadline_s=10.0, workflow_deadline_s=150.0)
    old_wf_hopeless = FakeCall(step="gen", ready_time_s=60.0, deadline_s=63.0, workflow_deadline_s=100.0)  # 3 s < 2 x 2 s
    calls = [new_wf_first_step, old_wf_hopeless, old_wf_late_step]
    order = lambda lo: sorted(calls, key=lambda x: lo.key(x, e))
    assert order(WorkflowFirst()) == [old_wf_late_step, new_wf_first_step, old_wf_hopeless]
    assert order(Urgency()) == [new_wf_first_step, old_wf_hopeless, old_wf_late_step]  # per-call slack
    assert order(WorkflowFirst(margin=1.0))[0] is old_wf_hopeless  # 3 s is enough for 2 s alone
    with pytest.raises(ValueError, match="margin"):
        WorkflowFirst(margin=-1.0)


def test_named_least_work_workflow_is_the_shipped_policy_file():
    """The name gives the knobs the shipped file was picked with (on tuning seeds), so
    `--policy least-work+workflow` and the file are the same policy."""
    from pathlib import Path

    shipped = load_policy(Path(__file__).resolve().parent.parent / "policies/pretrained/least-work+workflow")
    named = load_policy("least-work+workflow")
    assert named.spec()["dispatch"] == shipped.spec()["dispatch"] == {"name": "least-work", "backlog_weight": 0.07,
                                                                      "queue_weight": 0.6, "kv_weight": 2.0}
    assert named.spec()["local"] == shipped.spec()["local"] == {"name": "workflow-first", "margin": 2.0}


def test_calls_carry_their_workflow_deadline_in_the_simulator():
    from envs.sim.scenario import RunSpec, simulate

    seen = []

    class Spy(HeuristicPolicy):
        def dispatch(self, call, cluster):
            seen.append((call.workflow_deadline_s, cluster.workflow(call.workflow_id).deadline_s))
            return super().dispatch(call, cluster)

    policy = load_policy("least-work+workflow")
    simulate(RunSpec(cluster="paper", rate_qps=0.1, queries=3, seed=0), Spy(policy.dispatcher, policy.local, name="spy"))
    assert seen and all(a == b for a, b in seen)


def test_urgency_key_is_time_invariant_equivalent_of_paper_urgency():
    """Paper: admit max(elapsed + T_e(s) - budget). For any common `now`, that is min(deadline - T_e(s))."""
    e = FakeEngine({"gen": 3.0, "short": 0.2})
    rng = random.Random(1)
    calls = [FakeCall(step=rng.choice(["gen", "short"]), ready_time_s=r, deadline_s=r + rng.uniform(1, 50))
             for r in (rng.uniform(0, 10) for _ in range(20))]
    now = 12.0
    paper = max(calls, key=lambda x: (now - x.ready_time_s) + e.expected_latency_s(x.step) - (x.deadline_s - x.ready_time_s))
    assert min(calls, key=lambda x: Urgency().key(x, e)) is paper


# ---- named policies, files and errors ----------------------------------------------------------

REQUIRED_NAMES = ["rr", "random", "lor", "least-work", "llmd", "hexgen", "hexgen-outstanding", "rr+urgency", "wb+fcfs"]


@pytest.mark.parametrize("name", REQUIRED_NAMES)
def test_named_policies_load_and_round_trip(name, tmp_path):
    policy = load_policy(name)
    assert policy.name == name
    for suffix in (".yaml", ".json"):
        path = tmp_path / f"p{suffix}"
        save_policy(policy, path)
        again = load_policy(path)
        assert again.spec() == policy.spec()


def test_named_composition():
    assert load_policy("hexgen").spec()["dispatch"] == {"name": "workload-balanced", "alpha": 0.2, "work": "assigned"}
    assert load_policy("hexgen").spec()["local"]["name"] == "urgency"
    assert load_policy("hexgen-outstanding").spec()["dispatch"]["work"] == "outstanding"
    assert load_policy("rr+urgency").spec()["dispatch"]["name"] == "round-robin"
    assert load_policy("wb+fcfs").spec()["local"]["name"] == "fcfs"
    assert load_policy("llmd").spec()["dispatch"]["queue_weight"] == 2.0


def test_policy_file_with_base_and_knob_overrides(tmp_path):
    path = tmp_path / "tuned.yaml"
    path.write_text("base: hexgen-outstanding\ndispatch: {alpha: 0.35}\nlocal: {weight: 0.5}\n")
    p = load_policy(path)
    assert p.name == "hexgen-outstanding"
    assert p.spec()["dispatch"] == {"name": "workload-balanced", "alpha": 0.35, "work": "outstanding"}
    assert p.spec()["local"] == {"name": "urgency", "weight": 0.5}
    (tmp_path / "t.json").write_text(json.dumps({"name": "mine", "dispatch": {"name": "least-work"}, "local": {"name": "edf"}}))
    assert load_policy(tmp_path / "t.json").name == "mine"


@pytest.mark.parametrize("spec,fragment", [
    ({"base": "hexgen", "dispatch": {"alpha": 1.5}}, "alpha must be a number in [0, 1]"),
    ({"base": "hexgen", "dispatch": {"alpha": "high"}}, "alpha must be a number in [0, 1]"),
    ({"base": "hexgen", "dispatch": {"work": "total"}}, "work must be one of"),
    ({"base": "hexgen", "dispatch": {"beta": 1}}, "has no knob 'beta'"),
    ({"base": "hexgen", "local": {"weight": -0.1}}, "weight must be a number in [0, 1]"),
    ({"base": "llmd", "dispatch": {"queue_weight": -2}}, "queue_weight must be a number >= 0"),
    ({"base": "random", "dispatch": {"seed": 1.5}}, "seed must be an integer"),
    ({"base": "nope"}, "unknown policy name 'nope'"),
    ({"dispatch": {"name": "fastest"}, "local": {"name": "fcfs"}}, "unknown dispatcher 'fastest'"),
    ({"dispatch": {"name": "round-robin"}, "local": {"name": "lifo"}}, "unknown local order 'lifo'"),
    ({"base": "hexgen", "dispatch": [1, 2]}, "dispatch: must be a mapping"),
    ({"base": "hexgen", "knobs": {}}, "unknown field 'knobs'"),
    ({"kind": "neural"}, "unknown policy kind"),
])
def test_bad_specs_give_one_policy_error(spec, fragment):
    with pytest.raises(PolicyError) as info:
        policy_from_spec(spec)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_names_and_files(tmp_path):
    with pytest.raises(PolicyError, match="unknown policy name 'hexgne'"):
        load_policy("hexgne")
    with pytest.raises(PolicyError, match="not found"):
        load_policy(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("dispatch: [unclosed\n")
    with pytest.raises(PolicyError, match="cannot be parsed"):
        load_policy(bad)
    with pytest.raises(PolicyError, match="alpha"):
        HeuristicPolicy.named("hexgen", dispatch_knobs={"alpha": float("nan")})


def test_heuristics_run_in_the_simulator_with_a_failure():
    """Every named policy completes a small run in which an engine is down for a while."""
    from envs.sim.scenario import FailureSpec, RunSpec, simulate

    spec = RunSpec(rate_qps=0.05, slo_scale=3.0, queries=8, failures=[FailureSpec(engine=0, at_s=5.0, duration_s=60.0)])
    for name in REQUIRED_NAMES:
        result, sim = simulate(spec, load_policy(name))
        assert result["n_finished"] == 8, name


def test_tenant_priority_order_puts_important_tenants_first():
    from heuristics.local import TenantPriority

    order = TenantPriority()
    e = FakeEngine({"gen": 1.0})
    late_gold = FakeCall(priority=0, ready_time_s=500.0)
    early_bronze = FakeCall(priority=1, ready_time_s=1.0)
    early_gold = FakeCall(priority=0, ready_time_s=2.0)
    keys = sorted([(order.key(c, e), i) for i, c in enumerate([late_gold, early_bronze, early_gold])])
    assert [i for _, i in keys] == [2, 0, 1]
