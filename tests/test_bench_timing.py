"""The benchmarks' interleaved timing: every fn visited once per round, each after a warm-up, and a
fn's settle pause taken after each of its runs, outside the time measured."""
from pangu_ops.benchmarks import timing


def test_settle_pauses_after_each_run_outside_the_timed_calls(monkeypatch):
    events, clock = [], [0.0]  # a fake clock: each call takes 1 ms, each pause its length

    def sleep(s):
        events.append(("sleep", s))
        clock[0] += s

    def call(name):
        events.append(name)
        clock[0] += 1e-3

    monkeypatch.setattr(timing.time, "sleep", sleep)
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    fns = [lambda: call("a"), lambda: call("b")]
    out = timing.interleaved(fns, timing.torch.device("cpu"), rounds=3, min_time=0.0, settle=[0.0, 0.25])
    assert [len(t.samples) for t in out] == [3, 3]
    # one warm-up call each, then 3 rounds of one call each (min_time 0: a single repeat)
    assert events.count("a") == events.count("b") == 4
    # b's pause follows each of b's runs (warm-up included) and nothing else
    assert [events[i - 1] for i, e in enumerate(events) if e == ("sleep", 0.25)] == ["b"] * 4
    assert sum(e == ("sleep", 0.25) for e in events) == 4 and ("sleep", 0.0) not in events
    # and is not part of any timed sample
    assert all(abs(s - 1e-3) < 1e-9 for t in out for s in t.samples)
