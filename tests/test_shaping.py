"""Adaptive shaping as pure functions (STYLE 7 and 14): what a result says about its
site (observe), the one transition (decide) for every adaptive decision (grow, shrink,
pause, stop), the reply rules and the shaping file. No sockets, no clock: times are
given."""

from __future__ import annotations

import math
import tomllib

import pytest

from asmtp._core.shaping_rules import (
    BUILTIN_RULES,
    Rule,
    Shaping,
    SiteLimits,
    load_shaping,
    match_rule,
    per_second,
)
from asmtp._delivery.shaping import (
    Observation,
    Outcome,
    SiteState,
    decide,
    initial_state,
    message_slot,
    observe,
)
from asmtp.errors import InputError
from asmtp.results import RecipientResult

OK = Observation(Outcome.DELIVERED)


def throttled(sessions: int = 0) -> Observation:
    return Observation(Outcome.THROTTLED, sessions)


def result(
    status: str, code: int | None, enhanced: str | None, text: str, stage: str
) -> RecipientResult:
    return RecipientResult("a@x.test", status, code, enhanced, text, stage)  # type: ignore[arg-type]


def run(state: SiteState, seen: list[tuple[float, Observation]], shaping: Shaping) -> SiteState:
    for now, one in seen:
        state, _ = decide(state, one, now, shaping)
    return state


# --------------------------------------------------------------------------- grow


def test_slow_start_adds_a_session_per_delivery_below_the_threshold() -> None:
    shaping = Shaping(initial=2, slow_start_threshold=6)
    state = initial_state(shaping, 0.0)
    limits = []
    for i in range(4):
        state, decision = decide(state, OK, 0.1 * i, shaping)
        assert decision == "grow"
        limits.append(state.allowed(0.1 * i, 100))
    assert limits == [3, 4, 5, 6]


def test_above_the_threshold_one_session_per_round() -> None:
    shaping = Shaping(initial=4, slow_start_threshold=4)
    state = initial_state(shaping, 0.0)
    decisions = []
    for i in range(4):
        state, decision = decide(state, OK, 0.01 * i, shaping)
        decisions.append(decision)
    # a round is "limit" deliveries: 4 more deliveries make one more session
    assert decisions == ["hold", "hold", "hold", "grow"]
    assert state.allowed(1.0, 100) == 5


def test_growth_stops_at_the_site_maximum_and_the_runs_ceiling() -> None:
    shaping = Shaping(initial=2, max_concurrency=5, slow_start_threshold=100)
    state = run(initial_state(shaping, 0.0), [(i * 0.01, OK) for i in range(20)], shaping)
    assert state.allowed(1.0, 100) == 5
    assert state.allowed(1.0, 3) == 3  # the caller's concurrency caps every site


# --------------------------------------------------------------------------- shrink


def test_a_throttle_halves_the_limit_and_the_sessions_refused_become_a_ceiling() -> None:
    shaping = Shaping(initial=8, probe_every=30.0)
    state = initial_state(shaping, 0.0)
    # 8 sessions were open when the 9th was refused
    state, decision = decide(state, throttled(sessions=8), 1.0, shaping)
    assert decision == "shrink"
    assert state.limit == 4.0 and state.threshold == 4.0
    # it grows back, but not past the 8 sessions that were accepted, until the probe
    state = run(state, [(1.0 + i * 0.1, OK) for i in range(200)], shaping)
    assert state.allowed(20.0, 100) == 8
    state = run(state, [(31.0 + i * 0.1, OK) for i in range(20)], shaping)
    assert state.allowed(33.0, 100) > 8  # probe_every passed: it may try 9 again


def test_refusals_of_sessions_in_flight_shrink_once_per_interval() -> None:
    shaping = Shaping(initial=16, shrink_every=1.0)
    state = initial_state(shaping, 0.0)
    seen = [(2.0 + i * 0.01, throttled()) for i in range(10)]
    decisions = []
    for now, one in seen:
        state, decision = decide(state, one, now, shaping)
        decisions.append(decision)
    assert decisions == ["shrink"] + ["hold"] * 9
    assert state.limit == 8.0
    state, decision = decide(state, throttled(), 3.5, shaping)
    assert decision == "shrink" and state.limit == 4.0


def test_never_below_the_minimum() -> None:
    shaping = Shaping(initial=2, min_concurrency=1, shrink_every=0.0)
    state = run(initial_state(shaping, 0.0), [(i, throttled()) for i in range(1, 4)], shaping)
    assert state.limit == 1.0 and state.allowed(4.0, 100) == 1


@pytest.mark.parametrize("outcome", [Outcome.REFUSED, Outcome.TIMEOUT])
def test_refused_connections_and_timeouts_shrink_too(outcome: Outcome) -> None:
    shaping = Shaping(initial=6)
    state, decision = decide(initial_state(shaping, 0.0), Observation(outcome), 1.0, shaping)
    assert decision == "shrink" and state.limit == 3.0


def test_a_rate_refusal_lowers_the_rate_below_what_was_measured_then_it_recovers() -> None:
    shaping = Shaping(initial=4, rate_backoff=0.8, rate_step=0.01, probe_every=10.0)
    state = initial_state(shaping, 0.0)
    # 100 deliveries a second for two seconds: measured
    state = run(state, [(i / 100, OK) for i in range(1, 201)], shaping)
    assert state.measured == pytest.approx(100, rel=0.05)
    assert state.rate is None  # no limit until the site asks for one
    sessions = state.limit
    state, decision = decide(state, Observation(Outcome.RATE_LIMITED), 2.0, shaping)
    assert decision == "shrink"
    assert state.rate == pytest.approx(80, rel=0.05)
    assert state.limit == sessions  # a rate problem is not a session problem
    # a caller that counts deliveries in the last second exactly says so
    counted = Observation(Outcome.RATE_LIMITED, recent=70)
    assert decide(state, counted, 4.0, shaping)[0].rate_ceiling == 70.0
    # deliveries raise it again, to just under the rate that was refused...
    state = run(state, [(2.0 + i / 100, OK) for i in range(1, 300)], shaping)
    assert state.rate is not None
    assert state.rate == pytest.approx(state.rate_ceiling * shaping.rate_margin)
    # ...and past it once probe_every has passed
    state = run(state, [(13.0 + i / 100, OK) for i in range(1, 20)], shaping)
    assert state.rate > state.rate_ceiling


def test_a_configured_rate_is_never_exceeded() -> None:
    shaping = Shaping(rate=50.0, rate_step=0.5, probe_every=0.0)
    state = initial_state(shaping, 0.0)
    assert state.rate == 50.0
    state, _ = decide(state, Observation(Outcome.RATE_LIMITED), 1.0, shaping)
    state = run(state, [(1.0 + i / 10, OK) for i in range(1, 50)], shaping)
    assert state.rate is not None and state.rate <= 50.0


# --------------------------------------------------------------------------- pause, stop


def test_a_pause_rule_shuts_the_site_for_its_seconds() -> None:
    shaping = Shaping(initial=6)
    pause = Observation(Outcome.PAUSE, 3, seconds=120.0, rule="gmail-unusual-rate")
    state, decision = decide(initial_state(shaping, 0.0), pause, 10.0, shaping)
    assert decision == "pause"
    assert state.paused(129.0) and not state.paused(130.0)
    assert state.reason == "gmail-unusual-rate"
    assert state.limit == 3.0  # and it comes back slower


def test_a_site_where_everything_fails_for_a_while_is_paused() -> None:
    shaping = Shaping(dead_after=10.0, dead_failures=5, pause=60.0, shrink_every=0.0)
    state = initial_state(shaping, 0.0)
    decisions = []
    for now in (0.0, 3.0, 6.0, 9.0, 12.0):
        state, decision = decide(state, Observation(Outcome.REFUSED), now, shaping)
        decisions.append(decision)
    assert decisions[:4] == ["shrink"] * 4 and decisions[4] == "pause"
    assert state.paused(71.0) and not state.paused(72.0)


def test_one_delivery_clears_the_failure_streak() -> None:
    shaping = Shaping(dead_after=10.0, dead_failures=3)
    state = initial_state(shaping, 0.0)
    seen = [
        (0.0, throttled()),
        (5.0, throttled()),
        (6.0, OK),
        (11.0, throttled()),
        (12.0, throttled()),
    ]
    state = run(state, seen, shaping)
    assert not state.paused(12.5)
    assert state.failures == 2 and state.failing_since == 11.0


def test_a_stop_rule_stops_the_site_for_good() -> None:
    shaping = Shaping()
    stop = Observation(Outcome.STOP, rule="yahoo-ts03")
    state, decision = decide(initial_state(shaping, 0.0), stop, 1.0, shaping)
    assert decision == "stop" and state.stopped == "yahoo-ts03"
    assert decide(state, OK, 2.0, shaping) == (state, "hold")


def test_fixed_limits_do_not_adapt_but_still_pause() -> None:
    shaping = Shaping(adaptive=False, initial=5)
    state = initial_state(shaping, 0.0)
    assert decide(state, OK, 0.1, shaping)[1] == "hold"
    assert decide(state, throttled(), 0.1, shaping)[1] == "hold"
    pause = Observation(Outcome.PAUSE, seconds=5.0, rule="r")
    assert decide(state, pause, 0.1, shaping)[1] == "pause"


# --------------------------------------------------------------------------- observe


@pytest.mark.parametrize(
    ("reply", "outcome"),
    [
        (("delivered", 250, "2.0.0", "ok", "message"), Outcome.DELIVERED),
        (("permanent", 550, "5.1.1", "no such user", "rcpt"), Outcome.DELIVERED),
        (("transient", 421, "4.7.0", "Try again later", "greeting"), Outcome.THROTTLED),
        (("transient", 421, None, "too many connections", "greeting"), Outcome.THROTTLED),
        (("transient", 451, "4.7.1", "rate limited", "mail"), Outcome.RATE_LIMITED),
        (("transient", 452, "4.2.2", "mailbox full", "rcpt"), Outcome.NEUTRAL),
        (("transient", None, None, "connection refused", "connect"), Outcome.REFUSED),
        (("transient", None, None, "connect timed out", "connect"), Outcome.TIMEOUT),
        (("transient", None, None, "the recipient's deadline passed", "connect"), Outcome.NEUTRAL),
        (
            ("transient", 421, "4.7.28", "Our system has detected an unusual rate of", "mail"),
            Outcome.PAUSE,
        ),
        (
            ("transient", 451, "4.7.650", "The mail server [192.0.2.1] has been temporarily "
             "rate limited due to IP reputation", "mail"),
            Outcome.PAUSE,
        ),
        (
            ("transient", 421, "4.7.0", "[TSS04] Messages from 192.0.2.1 temporarily deferred "
             "due to unexpected volume or user complaints", "greeting"),
            Outcome.PAUSE,
        ),
        (("permanent", 554, None, "[TS03] All messages from 192.0.2.1 will be "
          "permanently deferred", "greeting"), Outcome.STOP),
    ],
)  # fmt: skip
def test_what_a_result_says_about_its_site(
    reply: tuple[str, int | None, str | None, str, str], outcome: Outcome
) -> None:
    assert observe(result(*reply)).outcome is outcome


def test_user_rules_come_first_and_replace_built_ins_by_name() -> None:
    mine = Rule("my-busy", action="pause", code=450, text="busy", seconds=30.0)
    seen = observe(result("transient", 450, None, "Server busy", "mail"), (mine,))
    assert (seen.outcome, seen.seconds, seen.rule) == (Outcome.PAUSE, 30.0, "my-busy")
    quiet = Rule("gmail-unusual-rate", action="ignore", enhanced="4.7.28")
    reply = result("transient", 421, "4.7.28", "unusual rate", "mail")
    assert observe(reply, (quiet,)).outcome is Outcome.NEUTRAL
    assert observe(reply).outcome is Outcome.PAUSE


def test_every_built_in_rule_cites_its_source_and_is_reachable() -> None:
    names = [rule.name for rule in BUILTIN_RULES]
    assert len(set(names)) == len(names)
    for rule in BUILTIN_RULES:
        assert rule.source.startswith(("https://", "RFC"))
    assert match_rule(451, "4.7.651", "temporarily rate limited due to IP reputation").name == (
        "microsoft-ip-reputation"
    )
    assert match_rule(421, None, "421 RP-002 The sending IP exceeded a connection rate").name == (
        "microsoft-rp"
    )
    assert match_rule(250, "2.0.0", "ok") is None


# --------------------------------------------------------------------------- rates


def test_messages_are_spaced_evenly_with_no_burst() -> None:
    starts = []
    free = -math.inf
    for _ in range(5):
        start, free = message_slot(free, 10.0, 4.0)
        starts.append(start)
    assert starts == pytest.approx([10.0, 10.25, 10.5, 10.75, 11.0])
    assert message_slot(-math.inf, 3.0, None) == (3.0, 3.0)
    # messages that came 0.75 s late make up for one slot missed, not three
    late = []
    for _ in range(4):
        start, free = message_slot(free, 12.0, 4.0)
        late.append(start)
    assert late == [12.0, 12.0, 12.25, 12.5]


# --------------------------------------------------------------------------- the file

SHAPING_TOML = """
initial = 2
max_concurrency = 8
rate = "100/s"
max_messages_per_connection = 50

[[rules]]
name = "provider-busy"
code = 421
text = "too busy"
action = "pause"
seconds = 90

[sites."*.provider.test"]
max_concurrency = 4
rate = "600/m"
"""


def test_a_shaping_file_loads() -> None:
    shaping = load_shaping(tomllib.loads(SHAPING_TOML))
    assert (shaping.initial, shaping.max_concurrency, shaping.rate) == (2, 8, 100.0)
    assert shaping.rules == (Rule("provider-busy", "pause", 421, None, "too busy", 90.0),)
    assert shaping.sites == (SiteLimits("*.provider.test", max_concurrency=4, rate=10.0),)
    site = shaping.limits_for(["mx1.provider.test"])
    assert (site.max_concurrency, site.rate, site.initial) == (4, 10.0, 2)
    assert shaping.limits_for(["mx.elsewhere.test"]) is shaping


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ({"inital": 3}, "unknown shaping setting"),
        ({"initial": 0}, "initial"),
        ({"shrink": 1.5}, "shrink"),
        ({"rate": "fast"}, "a rate looks like"),
        ({"rules": {"name": "x"}}, "list of tables"),
        ({"rules": [{"name": "x", "action": "slow"}]}, "give a code"),
        ({"rules": [{"name": "x", "code": 421, "action": "explode"}]}, "action must be"),
        ({"rules": [{"name": "x", "text": "(", "action": "slow"}]}, "bad text pattern"),
        ({"rules": [{"name": "x", "code": 421, "colour": "red"}]}, "unknown rule field"),
        ({"sites": {"*.x": {"max_concurrency": -1}}}, "max_concurrency"),
        ({"sites": {"*.x": {"speed": 1}}}, "unknown site setting"),
    ],
)
def test_a_bad_shaping_file_says_what_is_wrong(data: dict[str, object], says: str) -> None:
    with pytest.raises(InputError, match=says):
        load_shaping(data)


def test_rates_read_like_the_rate_option() -> None:
    assert per_second("50/s") == 50.0
    assert per_second("3600/h") == 1.0
    assert per_second(2.5) == 2.5
    with pytest.raises(InputError):
        per_second("0/s")
