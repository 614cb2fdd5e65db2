"""The reward-hacking rule on synthetic metric streams: the trained reward climbs while a held-out metric
degrades past tolerance for `patience` evaluations -> triggered; healthy or merely-bad runs never trigger."""
import pytest
from pydantic import ValidationError

from distar.config import HackingMonitorConfig
from distar.hacking_monitor import HackingMonitor


def _cfg(**kw):
    args = dict(held_out="eval/frechet", mode="min", tolerance=0.25, patience=2, action="stop")
    args.update(kw)
    return HackingMonitorConfig(**args)


def _run(monitor, stream, every=100):
    """stream: [(held_out or None, trained)] at steps every, 2*every, ...; the decisions."""
    out = []
    for i, (held, trained) in enumerate(stream, start=1):
        m = {"reward/total": trained}
        if held is not None:
            m["eval/frechet"] = held
        out.append(monitor.observe(i * every, m))
    return out


# frechet (lower is better) improves to 10.0 at step 300, then degrades while the reward keeps climbing
HACKING = [(20.0, 0.1), (14.0, 0.3), (10.0, 0.5), (11.0, 0.6), (13.0, 0.7), (13.5, 0.8), (15.0, 0.9)]


def test_a_hacking_stream_triggers_at_the_patience_th_degraded_evaluation():
    decisions = _run(HackingMonitor(_cfg()), HACKING)
    fired = [d.triggered for d in decisions]
    # step 400: 10% worse (within tolerance); 500: 30% worse (1/2); 600: 35% worse (2/2) -> trigger
    assert fired == [False, False, False, False, False, True, True]
    d = decisions[5]
    assert d.should_stop and d.best_step == 300
    assert "reward hacking" in d.reason and "eval/frechet" in d.reason and "35.0% worse" in d.reason


@pytest.mark.parametrize("action, stops", [("stop", True), ("keep_best", True), ("warn", False)])
def test_action_decides_should_stop(action, stops):
    mon = HackingMonitor(_cfg(action=action))
    d = _run(mon, HACKING)[5]
    assert d.triggered and d.should_stop is stops and d.best_step == 300
    assert mon.triggered_step == 600


def test_mode_max_and_patience_one():
    # held-out judge score (higher is better) peaks at 0.8, then falls 25%+ while the reward climbs
    stream = [(0.5, 1.0), (0.8, 2.0), (0.7, 3.0), (0.55, 4.0)]
    decisions = _run(HackingMonitor(_cfg(held_out="eval/frechet", mode="max", patience=1)), stream)
    assert [d.triggered for d in decisions] == [False, False, False, True]   # 12.5% then 31% worse


def test_healthy_streams_never_trigger():
    both_improve = [(20.0 - i, 0.1 * i) for i in range(10)]
    flat_within_tolerance = [(10.0, 0.1), *[(10.0 + (2.4 if i % 2 else 0.0), 0.1 + 0.1 * i) for i in range(10)]]
    for stream in (both_improve, flat_within_tolerance):
        assert not any(d.triggered for d in _run(HackingMonitor(_cfg(patience=1)), stream))


def test_degradation_without_a_climbing_reward_is_not_hacking():
    # the held-out metric collapses but the trained reward is not above its value at the best step
    falling_reward = [(20.0, 0.5), (10.0, 0.9), (15.0, 0.8), (18.0, 0.7), (25.0, 0.9), (30.0, 0.85)]
    decisions = _run(HackingMonitor(_cfg(patience=1)), falling_reward)
    assert not any(d.triggered for d in decisions)
    assert "reward not climbing" in decisions[3].reason
    # and a reward that climbs only in alternate evaluations never makes `patience` consecutive ones
    alternating = [(10.0, 0.5), (15.0, 0.6), (15.0, 0.4), (15.0, 0.6), (15.0, 0.4), (15.0, 0.6)]
    assert not any(d.triggered for d in _run(HackingMonitor(_cfg(patience=2)), alternating))


def test_a_new_best_resets_the_count_and_non_evaluations_change_nothing():
    stream = [(10.0, 0.1), (13.0, 0.2), (None, 0.3), (9.0, 0.4), (12.0, 0.5), (None, 0.6), (12.5, 0.7)]
    mon = HackingMonitor(_cfg())
    decisions = _run(mon, stream)
    assert [d.triggered for d in decisions] == [False] * 6 + [True]
    assert decisions[2].reason.startswith("no finite eval/frechet") and decisions[6].best_step == 400
    assert not HackingMonitor(_cfg()).observe(1, {"eval/frechet": float("nan"), "reward/total": 1.0}).triggered


def test_state_round_trip_continues_identically():
    a = HackingMonitor(_cfg(patience=3))
    _run(a, HACKING[:5])
    b = HackingMonitor(_cfg(patience=3))
    b.load_state_dict(a.state_dict())
    for step, (held, trained) in ((600, HACKING[5]), (700, HACKING[6])):
        da = a.observe(step, {"eval/frechet": held, "reward/total": trained})
        db = b.observe(step, {"eval/frechet": held, "reward/total": trained})
        assert da == db
    assert db.triggered and b.triggered_step == 700


def test_config_validation_names_the_field():
    with pytest.raises(ValidationError, match="tolerance"):
        _cfg(tolerance=0.0)
    with pytest.raises(ValidationError, match="patience"):
        _cfg(patience=0)
    with pytest.raises(ValidationError, match="action"):
        _cfg(action="explode")
    with pytest.raises(ValidationError, match="mode"):
        HackingMonitorConfig(held_out="eval/frechet")
