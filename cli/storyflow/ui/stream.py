"""Streamed replies (``step.delta`` events): which instances ``--follow STEP`` names, and
what the live view keeps of each reply, every delta in O(1).

While an ``llm`` step's reply streams, the engine sends coalesced ``step.delta`` events
(at most ~10 a second per instance): ``text`` that arrived since the previous delta of
the attempt, and ``tokens``, the chunks received so far in it. A new attempt starts its
text over.

- `follows`: whether ``--follow STEP`` names an instance.
- `Streams`: the live view's share. For each streaming instance a bounded tail (its row
  shows the last line and the tokens); for followed instances only, the last lines (a
  panel under the table) and the whole text (printed above the view when the attempt
  ends). ``rich`` is imported only while drawing.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

from storyflow.ui.lines import Event, Glyphs
from storyflow.ui.tally import SETTLED

if TYPE_CHECKING:
    from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
    from rich.measure import Measurement

__all__ = [
    "CONTROLS",
    "LINE_CHARS",
    "PANEL_LINES",
    "TAIL_CHARS",
    "Finished",
    "FollowPanel",
    "Streams",
    "TailNote",
    "crop_left",
    "follows",
    "last_line",
]

TAIL_CHARS = 200
"""Characters of each streaming instance's text kept for its row."""
PANEL_LINES = 12
"""Lines of a followed instance's text the panel shows."""
LINE_CHARS = 2_000
"""The panel keeps at most the last this many characters of each line."""

_PRINTED = {"step.succeeded": "", "step.failed": "failed", "step.cancelled": "cancelled"}
"""Ends of an attempt that print a followed instance's text above the view (→ a note)."""
_ENDS = frozenset({*SETTLED, *_PRINTED, "step.started", "step.retrying", "step.waiting"})
"""Events after which an instance's streamed text is over (a new attempt starts anew)."""
CONTROLS = {c: None for c in (*range(32), *range(127, 160)) if c not in (9, 10)}
"""Control characters but tab and newline, removed from streamed text before it is
written anywhere: the model's ESC, CR or BEL would drive the terminal (`str.translate`)."""
_CONTROLS = CONTROLS | {9: " "}
"""What the live view draws of streamed text: no controls, a tab as a space."""


def follows(step: str, instance: str) -> bool:
    """Whether ``--follow step`` names ``instance``: the instance itself (``draft[2]``),
    the items of a map (``draft`` → ``draft[0]``), what runs inside a loop (``polish`` →
    ``polish#1.revise``), a loop body's step in every iteration (``revise`` →
    ``polish#2.revise``), or what runs under an instance (``polish#2`` → ``polish#2.revise``)."""
    if not step:
        return False
    if instance == step:
        return True
    if instance.startswith(step) and instance[len(step)] in "[#.":
        return True
    return any(seg.partition("#")[0].partition("[")[0] == step for seg in instance.split("."))


class _Tail:
    """The end of one streaming instance's text, for its row."""

    __slots__ = ("attempt", "cut", "followed", "text", "tokens")

    def __init__(self, attempt: Any, followed: bool) -> None:
        self.attempt = attempt
        self.followed = followed
        """``--follow`` names the instance (decided once)."""
        self.text = ""
        """The last `TAIL_CHARS` characters, controls removed."""
        self.cut = False
        """Text came before `text`."""
        self.tokens: int | None = None


class _Text:
    """A followed instance's text: whole, and its last lines for the panel."""

    __slots__ = ("attempt", "chunks", "lines", "partial", "tokens")

    def __init__(self, attempt: Any, panel_lines: int) -> None:
        self.attempt = attempt
        self.chunks: list[str] = []
        """The whole text, as it came."""
        self.lines: deque[str] = deque(maxlen=panel_lines)
        """The last complete lines (each at most `LINE_CHARS`), controls removed."""
        self.partial = ""
        """The line under way."""
        self.tokens: int | None = None

    def add(self, text: str) -> None:
        self.chunks.append(text)
        pieces = text.translate(_CONTROLS).split("\n")
        ended = len(pieces) - 1  # lines this text ends
        if ended == 0:
            self.partial = (self.partial + pieces[0])[-LINE_CHARS:]
            return
        keep = self.lines.maxlen or 0
        if ended <= keep:  # the line under way ends and stays in view
            self.lines.append((self.partial + pieces[0])[-LINE_CHARS:])
        self.lines.extend(p[-LINE_CHARS:] for p in pieces[max(ended - keep, 1) : -1])
        self.partial = pieces[-1][-LINE_CHARS:]


class Streams:
    """The streamed text of the instances under way, as the live view shows it.

    `see` takes every event in O(1) (plus the length of a delta's text): a delta
    updates its instance's tail (and, when followed, its lines and whole text); an end
    of the attempt forgets them. `note` and `panel` are called for at most a view's
    rows, and cost the same whatever the length of the texts.
    """

    def __init__(self, follow: str | None, *, panel_lines: int = PANEL_LINES) -> None:
        self._follow = follow
        self._panel_lines = panel_lines
        self._tails: dict[str, _Tail] = {}
        self._texts: dict[str, _Text] = {}
        """Followed instances streaming, the latest to receive text last."""
        self._shown: str | None = None
        """The followed instance the panel shows, until its attempt ends."""

    def see(self, event: Event) -> Finished | None:
        """Take one event; a followed text to print above the view when its attempt ended."""
        etype, iid = event.get("type"), event.get("step")
        if not isinstance(iid, str):
            return None
        if etype == "step.delta":
            self._add(iid, event)
            return None
        if etype not in _ENDS:
            return None
        self._tails.pop(iid, None)
        text = self._texts.pop(iid, None)
        if iid == self._shown:
            self._shown = next(reversed(self._texts), None)
        note = _PRINTED.get(str(etype))
        if text is None or note is None or not text.chunks:
            return None
        if etype == "step.failed" and event.get("final") is False:
            note += " (will retry)"
        return Finished(iid, text.attempt, text.tokens, "".join(text.chunks), note)

    def _add(self, iid: str, event: Event) -> None:
        attempt, text, tokens = event.get("attempt"), event.get("text"), event.get("tokens")
        text = text if isinstance(text, str) else ""
        tail = self._tails.get(iid)
        if tail is None or tail.attempt != attempt:
            followed = self._follow is not None and follows(self._follow, iid)
            tail = self._tails[iid] = _Tail(attempt, followed)
        if isinstance(tokens, int):
            tail.tokens = tokens
        if text:
            kept = tail.text + text[-TAIL_CHARS:].translate(_CONTROLS)
            tail.cut = tail.cut or len(kept) > TAIL_CHARS or len(text) > TAIL_CHARS
            tail.text = kept[-TAIL_CHARS:]
        if not tail.followed:
            return
        whole = self._texts.pop(iid, None)  # and back at the end: the latest last
        if whole is None or whole.attempt != attempt:
            whole = _Text(attempt, self._panel_lines)
        self._texts[iid] = whole
        whole.tokens = tail.tokens
        if text:
            whole.add(text)
        if self._shown not in self._texts:
            self._shown = iid

    def note(self, iid: str, glyphs: Glyphs) -> TailNote | None:
        """The note of a streaming instance's row (None when it is not streaming)."""
        tail = self._tails.get(iid)
        if tail is None or (not tail.text and tail.tokens is None):
            return None
        return TailNote(tail.text, tail.cut, tail.tokens, glyphs)

    def panel(self, glyphs: Glyphs) -> FollowPanel | None:
        """The panel of the followed instance shown (None when no followed one streams)."""
        if self._shown is None:
            return None
        text = self._texts[self._shown]
        lines = [*text.lines, text.partial] if text.partial else list(text.lines)
        others = len(self._texts) - 1
        return FollowPanel(self._shown, text.attempt, text.tokens, lines, others, glyphs,
                           rows=self._panel_lines)


def _tokens(tokens: int | None) -> str:
    return f"{tokens:,} tok" if tokens is not None else ""


def last_line(tail: str, cut: bool) -> tuple[str, bool]:
    """The last line of ``tail`` (the one before when the last is blank), and whether
    its start is missing (it begins where ``tail``, which was ``cut``, begins)."""
    head, newline, last = tail.rpartition("\n")
    if not last.strip() and newline:
        head, newline, last = head.rpartition("\n")
    return last.strip(), cut and not newline


def crop_left(text: str, width: int, more: str) -> str:
    """``text`` in at most ``width`` cells, its start replaced by ``more`` if it is cut."""
    from rich.cells import cell_len

    if cell_len(text) <= width:
        return text
    room = width - cell_len(more)
    if room <= 0:
        return more[:width]
    kept = text[-room:]
    while cell_len(kept) > room:  # wide characters: a few more steps at most
        kept = kept[1:]
    return more + kept


class TailNote:
    """A streaming row's note: ``312 tok · …and the sea answered``, cropped at the left
    to the width it is given, so that the newest words show."""

    def __init__(self, tail: str, cut: bool, tokens: int | None, glyphs: Glyphs) -> None:
        self._prefix = _tokens(tokens)
        line, missing = last_line(tail, cut)
        self._line = (glyphs.more if missing and line else "") + line
        self._g = glyphs

    @property
    def plain(self) -> str:
        """The whole note, uncropped."""
        sep = self._g.sep if self._prefix and self._line else ""
        return f"{self._prefix}{sep}{self._line}"

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        from rich.cells import cell_len
        from rich.measure import Measurement

        return Measurement(1, max(cell_len(self.plain), 1))

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        from rich.cells import cell_len
        from rich.text import Text

        width, plain = options.max_width, self.plain
        if not self._line or cell_len(plain) <= width:
            yield Text(plain, style="dim", no_wrap=True, overflow="ellipsis")
            return
        head = f"{self._prefix}{self._g.sep}" if self._prefix else ""
        if cell_len(head) + cell_len(self._g.more) + 8 > width:
            head = ""  # too narrow for both: the words matter more
        line = crop_left(self._line, width - cell_len(head), self._g.more)
        yield Text(head + line, style="dim", no_wrap=True, overflow="crop")


class FollowPanel:
    """The followed instance's last lines in a panel, wrapped to the width it is given,
    at most as many rows as the panel keeps lines; titled with the instance and tokens."""

    def __init__(self, iid: str, attempt: Any, tokens: int | None, lines: list[str],
                 others: int, glyphs: Glyphs, *, rows: int = PANEL_LINES) -> None:
        self._lines, self._others, self._g, self._rows = lines, others, glyphs, rows
        parts = [f"{glyphs.write} {iid}"]
        if isinstance(attempt, int) and attempt > 1:
            parts.append(f"attempt {attempt}")
        if tokens is not None:
            parts.append(_tokens(tokens))
        self.title = glyphs.sep.join(parts)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        from rich.panel import Panel
        from rich.text import Text

        rows = list(Text("\n".join(self._lines)).wrap(
            console, max(options.max_width - 4, 1), overflow="fold"))[-self._rows:]
        body = Text("\n").join(rows)
        more = self._others
        subtitle = f"{self._g.more} and {more:,} more followed" if more else None
        yield Panel(body, title=Text(self.title), title_align="left", subtitle=subtitle,
                    subtitle_align="right", border_style="dim", expand=True)


class Finished:
    """A followed instance's whole text, printed above the live view once its attempt
    ended: a header line, then the text."""

    def __init__(self, iid: str, attempt: Any, tokens: int | None, text: str, note: str) -> None:
        self.iid, self.attempt, self.tokens, self.text, self.note = iid, attempt, tokens, text, note

    def header(self, glyphs: Glyphs) -> str:
        """``✎ draft[2] · 312 tok``, with the attempt after the first and how it ended
        other than successfully."""
        parts = [f"{glyphs.write} {self.iid}"]
        if isinstance(self.attempt, int) and self.attempt > 1:
            parts.append(f"attempt {self.attempt}")
        parts += [p for p in (self.note, _tokens(self.tokens)) if p]
        return glyphs.sep.join(parts)

    def printable(self, glyphs: Glyphs) -> RenderableType:
        """The header (bold) and the text, for ``console.print``."""
        from rich.console import Group
        from rich.text import Text

        return Group(Text(self.header(glyphs), style="bold"),
                     Text(self.text.translate(_CONTROLS).rstrip("\n")))
