"""Streamed replies (``step.delta``) in each sink: JSON lines, plain lines, the live view."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from rich.console import Console

from storyflow.ui.progress import JsonSink, LiveSink, PlainSink, follows, make_sink
from storyflow.ui.stream import LINE_CHARS, PANEL_LINES, TAIL_CHARS, crop_left, last_line

T0 = 1_796_400_000.0
RUN = "20261123-101500-ab12cd"


def ev(type_: str, at: float = 0.0, **fields: Any) -> dict[str, Any]:
    return {"type": type_, "run_id": RUN, "ts": T0 + at, **fields}


def delta(step: str, text: str, tokens: int, at: float = 0.0, attempt: int = 1) -> dict[str, Any]:
    return ev("step.delta", at, step=step, attempt=attempt, text=text, tokens=tokens)


# -- which instances a step names -----------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "instance", "expected"),
    [
        ("draft", "draft", True),
        ("draft[2]", "draft[2]", True),
        ("draft", "draft[0]", True),
        ("draft", "draft[12]", True),
        ("draft[1]", "draft[12]", False),
        ("draft", "drafts[0]", False),
        ("draft", "redraft", False),
        ("revise", "polish#2.revise", True),
        ("polish", "polish#1.revise", True),
        ("polish#2", "polish#2.revise", True),
        ("polish#2", "polish#20.revise", False),
        ("polish", "polish", True),
        ("revise", "polish#2.reviser", False),
        ("inner", "outer#1.inner#3.edit", True),
        ("edit", "outer#1.inner#3.edit", True),
        ("scene", "polish#1.scene[4]", True),
        ("scene[4]", "polish#1.scene[4]", False),  # an instance id names itself and its parts
        ("", "draft", False),
    ],
)
def test_follows(step: str, instance: str, expected: bool) -> None:
    assert follows(step, instance) is expected


# -- JSON lines ------------------------------------------------------------------------------

EVENTS = [
    ev("step.started", 1.0, step="draft[2]", attempt=1),
    delta("draft[2]", "Once upon", 2, 1.1),
    ev("step.succeeded", 2.0, step="draft[2]", attempt=1, duration_s=1.0),
]


def json_lines(sink: JsonSink, out: io.StringIO) -> list[dict[str, Any]]:
    for event in EVENTS:
        sink(event)
    sink.close()
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_json_drops_deltas_unless_asked() -> None:
    out = io.StringIO()
    assert json_lines(JsonSink(out), out) == [EVENTS[0], EVENTS[2]]
    out = io.StringIO()
    assert json_lines(JsonSink(out, deltas=True), out) == EVENTS


def test_make_sink_passes_stream_events_to_json() -> None:
    for stream_events, expected in ((False, [EVENTS[0], EVENTS[2]]), (True, EVENTS)):
        out = io.StringIO()
        sink = make_sink(json_mode=True, progress=None, stream=out, stream_events=stream_events)
        assert isinstance(sink, JsonSink)
        assert json_lines(sink, out) == expected


# -- plain lines -------------------------------------------------------------------------------


def plain(events: list[dict[str, Any]], follow: str | None, out: io.StringIO | None = None) -> str:
    stream = io.StringIO() if out is None else out
    sink = PlainSink(stream, clock_start=T0, follow=follow)
    for event in events:
        sink(event)
    sink.close()
    return stream.getvalue()


class Flushes(io.StringIO):
    """A stream that records what it held at each flush."""

    def __init__(self) -> None:
        super().__init__()
        self.flushed: list[str] = []

    def flush(self) -> None:
        self.flushed.append(self.getvalue())


def test_plain_writes_the_followed_text_raw_and_flushed() -> None:
    out = Flushes()
    events = [
        ev("step.started", 1.0, step="draft[2]", attempt=1),
        delta("draft[2]", "Once upon", 2, 1.1),
        delta("draft[2]", " a time.\nThe", 5, 1.2),
        delta("draft[2]", " end.", 7, 1.3),
        ev("step.succeeded", 2.0, step="draft[2]", attempt=1, duration_s=1.0, tokens=7),
    ]
    text = plain(events, "draft", out)
    assert text == (
        "00:01.0 ▶ draft[2] attempt 1\n"
        "00:01.1 ✎ draft[2] writes:\n"
        "Once upon a time.\n"
        "The end.\n"  # the step's end ends the text's line first
        "00:02.0 ✓ draft[2] 1.0s · 7 tok\n"
    )
    assert [f for f in out.flushed if f.endswith("Once upon")]  # each chunk as it comes


def test_plain_ignores_deltas_of_other_steps_and_without_follow() -> None:
    events = [
        ev("step.started", 1.0, step="plot", attempt=1),
        delta("plot", "not shown", 2, 1.1),
        delta("draft[0]", "shown\n", 2, 1.2),
        ev("step.succeeded", 2.0, step="plot", attempt=1, duration_s=1.0),
    ]
    assert plain(events, "draft") == (
        "00:01.0 ▶ plot attempt 1\n"
        "00:01.2 ✎ draft[0] writes:\n"
        "shown\n"
        "00:02.0 ✓ plot 1.0s\n"
    )
    assert plain(events, None) == "00:01.0 ▶ plot attempt 1\n00:02.0 ✓ plot 1.0s\n"


def test_plain_other_lines_and_other_instances_interrupt_the_text() -> None:
    events = [
        delta("draft[2]", "Once", 1, 1.1),
        ev("step.started", 1.3, step="plot", attempt=1),  # another line: ends "Once" first
        delta("draft[2]", " upon\n", 2, 1.4),  # ends with a newline: nothing added
        delta("draft[0]", "Other", 2, 1.5),  # another followed instance
        delta("draft[2]", "a time", 3, 1.6),
        ev("step.log", 1.7, step="draft[2]", message="thinking"),
        delta("draft[2]", ".", 4, 1.8),
        ev("step.succeeded", 2.0, step="draft[2]", attempt=1, duration_s=1.0),
        delta("draft[0]", " text", 3, 2.1),  # not ended by any event: ended by close()
    ]
    assert plain(events, "draft") == (
        "00:01.1 ✎ draft[2] writes:\n"
        "Once\n"
        "00:01.3 ▶ plot attempt 1\n"
        "00:01.4 ✎ draft[2] writes (continued):\n"
        " upon\n"
        "00:01.5 ✎ draft[0] writes:\n"
        "Other\n"
        "00:01.6 ✎ draft[2] writes (continued):\n"
        "a time\n"
        "00:01.7   draft[2]: thinking\n"
        "00:01.8 ✎ draft[2] writes (continued):\n"
        ".\n"
        "00:02.0 ✓ draft[2] 1.0s\n"
        "00:02.1 ✎ draft[0] writes (continued):\n"
        " text\n"
    )


def test_plain_a_retry_starts_the_text_over() -> None:
    events = [
        delta("plot", "First try", 2, 1.0),
        ev("step.failed", 1.5, step="plot", attempt=1, error={"class": "schema"}, final=False),
        ev("step.retrying", 1.5, step="plot", attempt=1, delay_s=0.5),
        ev("step.started", 2.0, step="plot", attempt=2),
        delta("plot", "Second try\n", 2, 2.1, attempt=2),
        delta("plot", "done\n", 3, 2.2, attempt=2),
    ]
    assert plain(events, "plot") == (
        "00:01.0 ✎ plot writes:\n"
        "First try\n"
        "00:01.5 ✗ plot attempt 1: schema (will retry)\n"
        "00:01.5 ↻ plot retry in 0.5s\n"
        "00:02.0 ▶ plot attempt 2\n"
        "00:02.1 ✎ plot attempt 2 writes:\n"
        "Second try\n"
        "done\n"
    )


def test_plain_never_writes_the_models_control_characters() -> None:
    """Streamed text is the model's: its escape sequences, CRs and bells stay off the
    terminal (and out of CI logs); tabs and newlines are text."""
    events = [delta("plot", "\x1b[2J\x1b[31mRed\x1b[0m\r\n", 1, 1.0),
              delta("plot", "\x07\x1b", 2, 1.1),  # nothing left: no header, no line
              delta("plot", "a\tb\u009b", 3, 1.2)]
    assert plain(events, "plot") == "00:01.0 ✎ plot writes:\n[2J[31mRed[0m\na\tb\n"


def test_plain_loop_body_steps_and_ascii() -> None:
    class Ascii(io.StringIO):
        @property
        def encoding(self) -> str:  # type: ignore[override]
            return "ascii"

    events = [delta("polish#2.revise", "Le café…", 2, 1.0), delta("polish#2.judge", "no", 1, 1.1)]
    assert plain(events, "revise", Ascii()) == "00:01.0 >> polish#2.revise writes:\nLe caf??\n"


def test_plain_a_finished_log_shows_the_whole_text() -> None:
    """``storyflow logs RUN --step draft``: the same sink over the events of a finished run."""
    log = [
        ev("run.started", 0.0, workflow="tale", steps=1),
        ev("step.started", 0.5, step="draft", attempt=1),
        *[delta("draft", f"line {i}\n", i + 1, 0.6 + i / 10) for i in range(3)],
        ev("step.succeeded", 1.0, step="draft", attempt=1, duration_s=0.5),
        ev("run.succeeded", 1.1, status="succeeded", duration_s=1.1),
    ]
    out = io.StringIO()
    sink = make_sink(json_mode=False, progress=False, stream=out, follow="draft")
    assert isinstance(sink, PlainSink)
    for event in log:
        sink(event)
    sink.close()
    assert out.getvalue().splitlines()[2:7] == [
        "00:00.6 ✎ draft writes:",
        "line 0",
        "line 1",
        "line 2",
        "00:01.0 ✓ draft 0.5s",
    ]


# -- the live view -------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def text_console(width: int = 100) -> Console:
    return Console(file=io.StringIO(), width=width, force_terminal=False, color_system=None)


def printed(console: Console) -> str:
    return console.file.getvalue()  # type: ignore[attr-defined, no-any-return]


def rendered(sink: LiveSink, width: int = 100) -> str:
    console = text_console(width)
    console.print(sink.render())
    out = printed(console)
    assert "\x1b" not in out
    return "\n".join(line.rstrip() for line in out.splitlines())


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def shown() -> Console:
    """The console the live sink draws on (what a person's scrollback would hold)."""
    return text_console()


@pytest.fixture
def live(clock: FakeClock, shown: Console) -> Iterator[LiveSink]:
    sink = LiveSink(shown, clock=clock, refresh_per_second=0.01, max_rows=12, follow="draft")
    yield sink
    sink.close()


def start(sink: LiveSink, *steps: str) -> None:
    sink(ev("run.started", workflow="tale", steps=2))
    sink(ev("step.started", step="draft", attempt=1, items=1))
    for step in steps:
        sink(ev("step.started", step=step, attempt=1))


def test_live_exact_view_of_streaming_rows_and_the_follow_panel(
    live: LiveSink, clock: FakeClock
) -> None:
    start(live, "draft[0]", "plot")
    clock.now += 1.5
    live(delta("plot", "The storm rose.\nAnd the sea answered\n", 312))
    live(delta("draft[0]", "Chapter one\n\nIt was", 5))
    assert rendered(live) == "\n".join(
        [
            f"tale · run {RUN} · 1.5s · running",
            " " * 70 + "steps 0/2 · instances 0/3 (0%)",
            "instances: running 2",
            "step      status   attempt  time",
            "draft[0]  running        1  1.5s  5 tok · It was",
            "plot      running        1  1.5s  312 tok · And the sea answered",
            "╭─ ✎ draft[0] · 5 tok " + "─" * 77 + "╮",
            "│ Chapter one" + " " * 86 + "│",
            "│" + " " * 98 + "│",
            "│ It was" + " " * 91 + "│",
            "╰" + "─" * 98 + "╯",
        ]
    )
    # On a narrow terminal the note gives way, keeping the newest words.
    narrow = rendered(live, 60).splitlines()
    assert "plot      running        1  1.5s  312 tok · …he sea answered" in narrow


def test_live_the_last_line_is_cut_at_its_start_to_fit(live: LiveSink) -> None:
    start(live, "plot")
    long_line = " ".join(f"word{i}" for i in range(100))  # longer than the kept tail
    live(delta("plot", long_line, 100))
    row = next(line for line in rendered(live).splitlines() if line.startswith("plot"))
    assert row.endswith("100 tok · …" + long_line[-(len(row) - row.index("…") - 1) :])
    assert row.endswith("word98 word99")
    assert len(row) <= 100


def test_live_without_follow_shows_rows_but_no_panel(clock: FakeClock) -> None:
    console = text_console()
    sink = LiveSink(console, clock=clock, refresh_per_second=0.01)
    start(sink, "draft[0]")
    sink(delta("draft[0]", "Hello there", 2))
    view = rendered(sink)
    assert "2 tok · Hello there" in view
    assert "╭" not in view
    sink(ev("step.succeeded", step="draft[0]", attempt=1, duration_s=1.0))
    sink.close()
    assert "Hello there" not in printed(console)


def test_live_the_followed_text_is_printed_once_when_its_step_ends(
    live: LiveSink, shown: Console
) -> None:
    start(live, "draft[0]")
    text = "".join(f"Line {i} of the chapter.\n" for i in range(40)) + "The end."
    chunks = [text[i : i + 7] for i in range(0, len(text), 7)]  # small ones, as they come
    for n, chunk in enumerate(chunks, 1):
        live(delta("draft[0]", chunk, n))
    tokens = len(chunks)
    view = rendered(live).splitlines()
    panel = [line for line in view if line.startswith("│")]
    assert len(panel) == PANEL_LINES
    assert panel[0].split("│")[1].strip() == "Line 29 of the chapter."
    assert panel[-1].split("│")[1].strip() == "The end."
    assert f"draft[0]  running        1  0.0s  {tokens} tok · The end." in view
    assert printed(shown) == ""

    live(ev("step.succeeded", step="draft[0]", attempt=1, duration_s=1.0, tokens=tokens))
    assert printed(shown) == f"✎ draft[0] · {tokens} tok\n{text}\n"
    assert "╭" not in rendered(live)  # the panel is gone with the text
    live(ev("run.succeeded", status="succeeded", duration_s=1.0))
    live.close()
    assert printed(shown).count("Line 0 of the chapter.") == 1


def test_live_a_retry_starts_the_text_over(live: LiveSink, shown: Console) -> None:
    start(live, "draft[0]")
    live(delta("draft[0]", "First try\nwas wrong", 9))
    live(ev("step.failed", step="draft[0]", attempt=1, error={"class": "schema"}, final=False))
    assert printed(shown) == "✎ draft[0] · failed (will retry) · 9 tok\nFirst try\nwas wrong\n"
    live(ev("step.retrying", step="draft[0]", attempt=1, delay_s=1.0))
    view = rendered(live)
    assert "tok ·" not in view  # a retrying row shows its error, not the old text
    assert "retry in 1.0s  schema" in view
    live(ev("step.started", step="draft[0]", attempt=2))
    assert "was wrong" not in rendered(live)
    live(delta("draft[0]", "Second", 1, attempt=2))
    view = rendered(live)
    assert "draft[0]  running        2  0.0s  1 tok · Second" in view
    assert "✎ draft[0] · attempt 2 · 1 tok" in view
    assert "First" not in view


def test_live_panel_keeps_one_followed_instance_until_it_ends(live: LiveSink) -> None:
    start(live, "draft[0]", "draft[1]", "draft[2]")
    live(delta("draft[0]", "zero", 1))
    live(delta("draft[1]", "one", 1))
    live(delta("draft[2]", "two", 1))
    live(delta("draft[1]", " more", 2))
    view = rendered(live)
    assert "╭─ ✎ draft[0] · 1 tok" in view
    assert "… and 2 more followed" in view
    live(ev("step.succeeded", step="draft[0]", attempt=1, duration_s=1.0))
    assert "╭─ ✎ draft[1] · 2 tok" in rendered(live)  # the latest to write


def test_live_control_characters_are_not_drawn(live: LiveSink, shown: Console) -> None:
    start(live, "draft[0]")
    live(delta("draft[0]", "a\x1b[2Jb\tc\r\n", 3))
    view = rendered(live)
    assert "3 tok · a[2Jb c" in view
    live(ev("step.succeeded", step="draft[0]", attempt=1, duration_s=1.0))
    assert "\x1b" not in printed(shown)


def test_last_line_and_crop_left() -> None:
    assert last_line("a\nb c\n", cut=True) == ("b c", False)
    assert last_line("tail of a long line", cut=True) == ("tail of a long line", True)
    assert last_line("tail\nnext", cut=True) == ("next", False)
    assert last_line("", cut=False) == ("", False)
    assert crop_left("and the sea answered", 12, "…") == "…ea answered"
    assert crop_left("short", 12, "…") == "short"
    assert crop_left("海海海海海海", 6, "…") == "…海海"


def test_make_sink_gives_the_live_view_the_followed_step() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    sink = make_sink(json_mode=False, progress=None, stream=Tty(),
                     environ={"TERM": "xterm"}, follow="draft")
    assert isinstance(sink, LiveSink)
    try:
        sink(delta("draft[0]", "hello", 1))
        assert "✎ draft[0] · 1 tok" in rendered(sink)
    finally:
        sink.close()


# -- bounded cost ----------------------------------------------------------------------------


def stream_many(sink: LiveSink, steps: int, deltas: int, chunk: str) -> None:
    sink(ev("run.started", workflow="big", steps=1))
    sink(ev("step.started", step="draft", attempt=1, items=steps))
    for i in range(steps):
        sink(ev("step.started", step=f"draft[{i}]", attempt=1))
    for n in range(deltas):
        for i in range(steps):
            sink(delta(f"draft[{i}]", chunk, n + 1))


def test_live_render_of_100_streaming_steps_touches_at_most_max_rows(clock: FakeClock) -> None:
    sink = LiveSink(text_console(), clock=clock, refresh_per_second=0.01, max_rows=12,
                    follow="draft[7]")
    notes = 0
    note = sink._streams.note

    def counting_note(*args: Any) -> Any:
        nonlocal notes
        notes += 1
        return note(*args)

    sink._streams.note = counting_note
    chunk = "a few words go by, " * 3 + "\n"
    stream_many(sink, 100, 20, chunk)  # the panel fills with its 12 lines
    early = rendered(sink).splitlines()
    assert notes == 12
    for n in range(20, 400):  # twenty times the text
        for i in range(100):
            sink(delta(f"draft[{i}]", chunk, n + 1))
    late = rendered(sink).splitlines()
    assert notes == 24  # one note per row drawn, whatever the number of steps
    assert len(late) == len(early)  # the same view, whatever the length of the texts
    assert len([line for line in late if line.startswith("draft[")]) == 12
    assert "… and 88 more" in late
    assert max(len(line) for line in late) <= 100
    assert "✎ draft[7] · 400 tok" in late[-PANEL_LINES - 2]
    streams = sink._streams  # what is kept is bounded too: a tail per row, lines followed
    assert max(len(t.text) for t in streams._tails.values()) <= TAIL_CHARS
    assert list(streams._texts) == ["draft[7]"]
    assert len(streams._texts["draft[7]"].lines) == PANEL_LINES
    sink.close()


def test_live_a_huge_line_keeps_a_bounded_panel(live: LiveSink) -> None:
    start(live, "draft[0]")
    for _ in range(100):
        live(delta("draft[0]", "x" * 1_000, 1))
    text = live._streams._texts["draft[0]"]
    assert len(text.partial) == LINE_CHARS
    panel = [line for line in rendered(live).splitlines() if line.startswith("│")]
    assert len(panel) == PANEL_LINES


def best_render_s(sink: LiveSink) -> float:
    console = text_console()
    best = float("inf")
    for _ in range(7):
        t = time.perf_counter()
        console.print(sink.render())
        best = min(best, time.perf_counter() - t)
    return best


def test_live_render_time_does_not_grow_with_steps_or_text(clock: FakeClock) -> None:
    small = LiveSink(text_console(), clock=clock, refresh_per_second=0.01, follow="draft[3]")
    stream_many(small, 100, 5, "short words\n")
    big = LiveSink(text_console(), clock=clock, refresh_per_second=0.01, follow="draft[3]")
    stream_many(big, 1_000, 50, "many more words " * 20 + "\n")
    try:
        # Loose: the same rows and panel are drawn; allow for noise, not for growth
        # (1,000 rows or texts a hundred times longer would cost tens of times more).
        assert best_render_s(big) < 3 * best_render_s(small) + 0.005
    finally:
        small.close()
        big.close()
