"""What an endpoint turned out not to support, and the request body that avoids it.

Servers that speak "OpenAI-compatible" differ at the edges: llama.cpp once answered
``response_format`` with HTTP 400; some servers reject ``"stream": true``, some ignore
it and answer one JSON body, some stream but reject ``stream_options``. Each such
finding is remembered per base URL for the agent's lifetime, so only the first call pays
for it: later calls are sent without the feature at once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from storyflow.agents.llm_agent._request import Request

_STREAM = re.compile(r"\bstream(?:ing)?\b")
"""``stream`` as a word: not ``upstream``."""
NOTES = {
    "response_format": "does not support response_format; retrying without JSON mode "
                       "(the prompt still asks for JSON)",
    "stream_options": "does not support stream_options; retrying without it (a stream "
                      "without usage is metered as estimated)",
    "stream": "does not support streaming; retrying without it (later calls do not stream)",
    "ignored": "answered without streaming; later calls do not ask it to stream",
}
"""What the log says when a feature is dropped, after the base URL."""


@dataclass(slots=True)
class Quirks:
    """The features of one base URL, true until its server is found to lack them.

    A call works on its own copy (`copy`): what it asks for must not change under it
    when a call beside it finds a feature missing; it drops its findings in both."""

    response_format: bool = True
    stream: bool = True
    stream_options: bool = True

    def copy(self) -> Quirks:
        return Quirks(self.response_format, self.stream, self.stream_options)

    def body(self, req: Request, messages: list[dict[str, Any]]) -> dict[str, Any]:
        """The body of ``req`` with ``messages``, without what the server lacks."""
        return req.body(messages, json_mode=req.json_mode and self.response_format,
                        stream=req.stream and self.stream, usage=self.stream_options)

    def refused(self, status: int, text: str, req: Request) -> str | None:
        """The feature this call asked for that an answer of HTTP ``status`` saying
        ``text`` says the server does not support (a key of `NOTES`), or None when the
        answer is about something else."""
        if status != 400:
            return None
        text = text.lower()
        if req.json_mode and self.response_format and "response_format" in text:
            return "response_format"
        streams = req.stream and self.stream
        if streams and self.stream_options and "stream_options" in text:
            return "stream_options"
        if streams and _STREAM.search(text):
            return "stream"
        return None

    def drop(self, feature: str) -> None:
        """Go without ``feature`` (a key of `NOTES`) from now on."""
        if feature == "response_format":
            self.response_format = False
        elif feature == "stream_options":
            self.stream_options = False
        elif feature in ("stream", "ignored"):
            self.stream = False
