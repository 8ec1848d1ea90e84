"""The run-progress sinks: plain lines, JSON lines, the live view, and the choice among them."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from rich.console import Console

from storyflow.ui.progress import JsonSink, LiveSink, PlainSink, make_sink, summary_line

T0 = 1_795_000_000.0
RUN = "20261123-101500-ab12cd"


def ev(type_: str, at: float = 0.0, **fields: Any) -> dict[str, Any]:
    return {"type": type_, "run_id": RUN, "ts": T0 + at, **fields}


TRANSIENT = {"class": "transient", "message": "connection refused"}
SUMMARY = ev(
    "run.summary",
    9.9,
    status="succeeded",
    outputs={"story": "…"},
    steps={"skipped": 2, "succeeded": 10},
    duration_s=9.9,
)

# (event, plain line) for every event type the engine emits, and one it does not.
PLAIN_CASES = [
    (
        ev("run.started", workflow="short-story", steps=12, inputs={}),
        f"00:00.0 run.started short-story (12 steps) run {RUN}",
    ),
    (ev("step.started", 1.3, step="draft[2]", attempt=1), "00:01.3 ▶ draft[2] attempt 1"),
    (
        ev("step.succeeded", 2.9, step="draft[2]", attempt=1, duration_s=1.6),
        "00:02.9 ✓ draft[2] 1.6s",
    ),
    (
        ev(
            "step.succeeded",
            2.9,
            step="draft[3]",
            attempt=1,
            duration_s=1.6,
            tokens=120,
            cost=0.0012,
            degraded=True,
        ),
        "00:02.9 ✓ draft[3] 1.6s · 120 tok · $0.0012 · degraded",
    ),
    (
        ev("step.failed", 3.0, step="plot", attempt=2, error=TRANSIENT, final=False),
        "00:03.0 ✗ plot attempt 2: transient: connection refused (will retry)",
    ),
    (
        ev("step.retrying", 3.0, step="plot", attempt=2, delay_s=2.0, error=TRANSIENT),
        "00:03.0 ↻ plot retry in 2.0s",
    ),
    (
        ev("step.failed", 5.0, step="plot", attempt=3, error=TRANSIENT, final=True),
        "00:05.0 ✗ plot attempt 3: transient: connection refused",
    ),
    (
        ev("step.skipped", 3.1, step="epilogue", reason="when was false"),
        "00:03.1 ⤼ epilogue skipped: when was false",
    ),
    (ev("step.skipped", 3.1, step="coda"), "00:03.1 ⤼ coda skipped"),
    (
        ev("step.cancelled", 3.2, step="polish", reason="run interrupted"),
        "00:03.2 ⊘ polish cancelled: run interrupted",
    ),
    (ev("step.cached", 3.3, step="premise", attempt=1), "00:03.3 ≡ premise cached"),
    (
        ev("step.kept", 3.3, step="setting", attempt=1, duration_s=0.4, tokens=80),
        "00:03.3 ≡ setting kept 0.4s · 80 tok",
    ),
    (
        ev("step.log", 3.4, step="draft[2]", message="line one\nline two"),
        "00:03.4   draft[2]: line one ⏎ line two",
    ),
    (ev("step.exploded", 3.5, step="x", why="unknown"), "00:03.5 step.exploded x why=unknown"),
    (ev("run.succeeded", 9.9, status="succeeded", duration_s=9.9), "00:09.9 run.succeeded in 9.9s"),
    (
        ev(
            "run.failed",
            75.25,
            status="failed",
            duration_s=75.25,
            error={"class": "budget_exceeded", "message": "cost over $1.00"},
        ),
        "01:15.2 run.failed in 1m15s: budget_exceeded: cost over $1.00",
    ),
    (
        ev("run.interrupted", 9.9, status="interrupted", duration_s=9.9),
        "00:09.9 run.interrupted in 9.9s",
    ),
    (ev("run.waiting", 9.9, status="waiting", duration_s=9.9), "00:09.9 run.waiting in 9.9s"),
    (SUMMARY, "summary: succeeded · 12 steps (10 succeeded, 2 skipped) · 9.9s"),
]


def plain_lines(events: list[dict[str, Any]], stream: io.StringIO | None = None) -> list[str]:
    out = io.StringIO() if stream is None else stream
    sink = PlainSink(out, clock_start=T0)
    for event in events:
        sink(event)
    sink.close()
    text = out.getvalue()
    assert "\x1b" not in text
    return text.splitlines()


@pytest.mark.parametrize(("event", "line"), PLAIN_CASES, ids=[c[1][:30] for c in PLAIN_CASES])
def test_plain_line_per_event(event: dict[str, Any], line: str) -> None:
    assert plain_lines([event]) == [line]


def test_plain_offsets_start_at_the_first_event_without_clock_start() -> None:
    out = io.StringIO()
    sink = PlainSink(out)
    sink(ev("run.started", 100.0, workflow="w", steps=1))
    sink(ev("step.started", 161.36, step="a", attempt=1))
    sink({"type": "step.started", "step": "b", "attempt": 1})  # no ts: the last one holds
    assert out.getvalue().splitlines() == [
        f"00:00.0 run.started w (1 step) run {RUN}",
        "01:01.4 ▶ a attempt 1",
        "01:01.4 ▶ b attempt 1",
    ]


def test_plain_summary_with_tokens_and_cost() -> None:
    summary = {**SUMMARY, "tokens": 12_345, "cost": 0.0123}
    expected = (
        "summary: succeeded · 12 steps (10 succeeded, 2 skipped) · 9.9s · 12,345 tok · $0.0123"
    )
    assert plain_lines([summary]) == [expected]
    assert summary_line(summary) == expected


def test_plain_tolerates_odd_events() -> None:
    lines = plain_lines([{"type": ["odd"], "ts": T0}, ev("step.started", 1.0)])
    assert lines == ["00:00.0 ['odd']", "00:01.0 step.started"]


class AsciiStream(io.StringIO):
    """A stream that, like a C-locale terminal, can only encode ASCII."""

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "ascii"


def test_plain_ascii_fallback() -> None:
    events = [case[0] for case in PLAIN_CASES[1:6]]
    events.append(ev("step.skipped", 3.1, step="épilogue", reason="when was false"))
    events.append(ev("step.cached", 3.3, step="premise"))
    events.append(SUMMARY)
    lines = plain_lines(events, AsciiStream())
    assert lines == [
        "00:01.3 > draft[2] attempt 1",
        "00:02.9 + draft[2] 1.6s",
        "00:02.9 + draft[3] 1.6s | 120 tok | $0.0012 | degraded",
        "00:03.0 x plot attempt 2: transient: connection refused (will retry)",
        "00:03.0 ~ plot retry in 2.0s",
        "00:03.1 - ?pilogue skipped: when was false",
        "00:03.3 = premise cached",
        "summary: succeeded | 12 steps (10 succeeded, 2 skipped) | 9.9s",
    ]
    for line in lines:
        line.encode("ascii")


def test_json_lines_parse_back_to_the_events() -> None:
    out = io.StringIO()
    sink = JsonSink(out)
    events = [case[0] for case in PLAIN_CASES]
    for event in events:
        sink(event)
    sink.close()
    lines = out.getvalue().splitlines()
    assert [json.loads(line) for line in lines] == events
    assert lines[-1].startswith('{"type":"run.summary","run_id":')
    assert '"story":"…"' in lines[-1]  # ensure_ascii=False on a UTF stream


def test_json_escapes_on_an_ascii_stream_and_stringifies_the_rest() -> None:
    out = AsciiStream()
    JsonSink(out)(ev("step.log", step="é", message=Ellipsis))
    line = out.getvalue()
    line.encode("ascii")
    assert json.loads(line)["step"] == "é"
    assert json.loads(line)["message"] == "Ellipsis"


# -- the live view -------------------------------------------------------------------------


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def text_console() -> Console:
    return Console(file=io.StringIO(), width=100, force_terminal=False, color_system=None)


def rendered(sink: LiveSink) -> str:
    console = text_console()
    console.print(sink.render())
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert "\x1b" not in out
    return "\n".join(line.rstrip() for line in out.splitlines())


@pytest.fixture
def live_sink() -> Iterator[tuple[LiveSink, FakeClock]]:
    clock = FakeClock()
    # A refresh rate this low keeps rich's thread from drawing during a test.
    sink = LiveSink(text_console(), clock=clock, refresh_per_second=0.01, max_rows=12)
    yield sink, clock
    sink.close()


def test_live_10000_steps_render_a_bounded_view(live_sink: tuple[LiveSink, FakeClock]) -> None:
    sink, clock = live_sink
    calls = 0
    render = sink.render

    def counting_render() -> Any:
        nonlocal calls
        calls += 1
        return render()

    sink.render = counting_render  # type: ignore[method-assign]
    sink(ev("run.started", workflow="big", steps=10_000, inputs={}))
    assert calls == 1  # rich's Live draws once as it is created, on the first event
    for i in range(10_000):
        sink(ev("step.started", step=f"s[{i}]", attempt=1))
    clock.now += 2.5
    for i in range(9_980):
        sink(ev("step.succeeded", step=f"s[{i}]", attempt=1, duration_s=0.1, tokens=3))
    sink(ev("step.failed", step="s[9999]", attempt=1, error=TRANSIENT, final=True))
    clock.now += 1.0

    assert calls == 1  # and never again for an event
    assert sink.live is not None
    assert sink.live.auto_refresh
    assert sink.live.refresh_per_second == 0.01

    out = rendered(sink)
    lines = out.splitlines()
    assert lines[0] == f"big · run {RUN} · 3.5s · running"
    assert lines[1].endswith(" 9,981/10,000 (99%)")
    assert lines[2] == "instances: running 19 · succeeded 9,980 · failed 1"
    rows = [line for line in lines if line.startswith("s[")]
    assert len(rows) == 12
    assert rows[0].split() == ["s[9980]", "running", "1", "3.5s"]
    assert "… and 7 more" in lines
    assert "tokens 29,940 · cost $0.0000" in lines
    assert lines[-1] == "✗ s[9999]  transient: connection refused"
    assert calls == 2


def test_live_exact_view_with_a_retry_countdown(live_sink: tuple[LiveSink, FakeClock]) -> None:
    sink, clock = live_sink
    sink(ev("run.started", workflow="short-story", steps=4))
    sink(ev("step.succeeded", step="premise", attempt=1, duration_s=0.5, tokens=1200, cost=0.0125))
    sink(ev("step.started", step="plot", attempt=2))
    sink(ev("step.started", step="[bold]x", attempt=1))
    sink(ev("step.log", step="[bold]x", message="thinking"))
    clock.now += 1.0
    sink(ev("step.failed", step="plot", attempt=2, error=TRANSIENT, final=False))
    sink(ev("step.retrying", step="plot", attempt=2, delay_s=2.0, error=TRANSIENT))
    clock.now += 0.6
    assert rendered(sink) == "\n".join(
        [
            f"short-story · run {RUN} · 1.6s · running",
            "━" * 17 + " " * 52 + "steps 1/4 · instances 1/4 (25%)",
            "instances: running 1 · retrying 1 · succeeded 1",
            "step     status    attempt           time",
            "plot     retrying        2  retry in 1.4s  transient",
            "[bold]x  running         1           1.6s  thinking",
            "tokens 1,200 · cost $0.0125",
        ]
    )
    clock.now += 5.0  # the countdown stops at zero
    assert "retry in 0.0s" in rendered(sink)
    sink(ev("step.started", step="plot", attempt=3))
    clock.now += 0.2
    assert "plot     running        3  0.2s" in rendered(sink).splitlines()


def test_live_close_stops_and_prints_the_summary() -> None:
    console = text_console()
    sink = LiveSink(console, clock=FakeClock(), refresh_per_second=0.01)
    sink(ev("run.started", workflow="w", steps=2))
    sink(ev("step.succeeded", step="a", attempt=1, duration_s=1.0))
    sink(ev("step.skipped", step="b", reason="when was false"))
    sink(ev("run.succeeded", status="succeeded", duration_s=1.2))
    summary = ev(
        "run.summary",
        status="succeeded",
        outputs={},
        steps={"succeeded": 1, "skipped": 1},
        duration_s=1.2,
        tokens=7,
    )
    sink(summary)
    live = sink.live
    assert live is not None
    was_started = live.is_started
    sink.close()
    sink.close()  # idempotent
    assert (was_started, live.is_started) == (True, False)
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert out.splitlines()[0] == f"w · run {RUN} · 0.0s · succeeded"  # rich's final frame
    assert out.endswith(f"\n{summary_line(summary)}\n")
    assert (
        summary_line(summary)
        == "summary: succeeded · 2 steps (1 succeeded, 1 skipped) · 1.2s · 7 tok"
    )


def test_live_close_without_a_summary_event_summarises_its_counters() -> None:
    console = text_console()
    clock = FakeClock()
    sink = LiveSink(console, clock=clock, refresh_per_second=0.01)
    sink(ev("step.cached", step="a"))
    clock.now += 3.0
    sink.close()
    last = console.file.getvalue().splitlines()[-1]  # type: ignore[attr-defined]
    assert last == "summary: running · 1 step (1 cached) · 3.0s"


def test_live_close_before_any_event_prints_nothing() -> None:
    console = text_console()
    sink = LiveSink(console)
    sink.close()
    sink(ev("step.started", step="late"))  # after close: counted, never drawn
    assert sink.live is None
    assert console.file.getvalue() == ""  # type: ignore[attr-defined]


# -- choosing a sink -----------------------------------------------------------------------


class TtyStream(io.StringIO):
    """A stream that claims to be a terminal."""

    def isatty(self) -> bool:
        return True


def test_make_sink_choices() -> None:
    tty = TtyStream()
    env = {"TERM": "xterm-256color"}
    assert isinstance(make_sink(json_mode=True, progress=None, stream=tty, environ=env), JsonSink)
    assert isinstance(
        make_sink(json_mode=False, progress=None, stream=io.StringIO(), environ=env), PlainSink
    )
    assert isinstance(
        make_sink(json_mode=False, progress=True, stream=io.StringIO(), environ=env), PlainSink
    )
    assert isinstance(
        make_sink(json_mode=False, progress=False, stream=tty, environ=env), PlainSink
    )
    assert isinstance(
        make_sink(json_mode=False, progress=None, stream=tty, environ={"TERM": "dumb"}), PlainSink
    )
    live = make_sink(json_mode=False, progress=None, stream=tty, environ=env)
    assert isinstance(live, LiveSink)
    live.close()


def test_plain_and_json_runs_never_import_rich() -> None:
    code = (
        "import io, sys\n"
        "from storyflow.ui.progress import make_sink\n"
        "for j in (False, True):\n"
        "    s = make_sink(json_mode=j, progress=None, stream=io.StringIO())\n"
        "    s({'type': 'step.started', 'run_id': 'r', 'ts': 1.0, 'step': 'a', 'attempt': 1})\n"
        "    s.close()\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'rich'], 'rich imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_live_a_waiting_step_leaves_the_running_rows_with_a_notice(
    live_sink: tuple[LiveSink, FakeClock],
) -> None:
    sink, _ = live_sink
    sink(ev("run.started", workflow="approval", steps=2))
    sink(ev("step.started", step="approve", attempt=1))
    sink(ev("step.waiting", step="approve", attempt=1, answer_step="approve",
            question="Ship it?", schema={"type": "boolean"}))
    text = rendered(sink)
    assert "approve waits for an answer: Ship it?" in text
    assert "waiting" in text  # counted among the settled steps
