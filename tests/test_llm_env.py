"""`--env llm` turns the example workflows' offline writers into `llm` agents.

The "model" is the fake OpenAI-compatible server of `llm_server`: it answers a request
for JSON with an object made to the schema in the system message, and anything else
with a line of prose. Each workflow must run to the end this way — sub-workflows too.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import run_cli
from llm_server import FakeLLM, Reply, Request, ok

REPO = Path(__file__).resolve().parents[1]
MARK = "JSON Schema, and nothing else (no commentary, no code fences):\n"


def made_to(schema: Any, depth: int = 0) -> Any:
    """A value that matches ``schema`` (the subset the examples use)."""
    if not isinstance(schema, dict):
        return "text"
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = kind[0]
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        return {k: made_to(v, depth + 1) for k, v in props.items()}
    if kind == "array":
        n = max(schema.get("minItems", 2), 1)
        return [made_to(schema.get("items", {}), depth + 1) for _ in range(n)]
    if kind == "integer":
        return max(schema.get("minimum", 8), min(schema.get("maximum", 8), 8))
    if kind == "number":
        return float(max(schema.get("minimum", 8), min(schema.get("maximum", 8), 8)))
    if kind == "boolean":
        return True
    return "A line the model wrote."


def answer(request: Request) -> Reply:
    body = request.body if isinstance(request.body, dict) else {}
    for message in body.get("messages", []):
        content = message.get("content") or ""
        if MARK in content:
            schema = json.loads(content.split(MARK, 1)[1])
            return ok(json.dumps(made_to(schema)))
    return ok("The keeper climbed the stairs and lit the lamp, and the sea answered.")


@pytest.fixture(scope="module")
def model() -> Iterator[FakeLLM]:
    with FakeLLM(answer) as server:
        yield server


def run(tmp_path: Path, model: FakeLLM, name: str, *args: str) -> dict[str, Any]:
    for item in ("short-story.yaml", "novella.yaml", "chapter.yaml", "batch.yaml",
                 "premises.jsonl", "storylib.py", "grammars"):
        src = REPO / "workflows" / item
        dst = tmp_path / item
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        elif src.exists():
            shutil.copy(src, dst)
    before = len(model.requests)
    result = run_cli(
        "run", tmp_path / name, "--env", "llm", "--json", *args,
        state_dir=tmp_path / "state", cwd=tmp_path,
        env={"STORYFLOW_LLM_BASE_URL": model.url, "OPENAI_API_KEY": "sk-env-llm-test-key"},
    )
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr)
    summary: dict[str, Any] = json.loads(result.stdout.splitlines()[-1])
    summary["requests"] = len(model.requests) - before
    return summary


def test_short_story_with_an_llm(tmp_path: Path, model: FakeLLM) -> None:
    summary = run(tmp_path, model, "short-story.yaml")
    assert summary["status"] == "succeeded"
    assert summary["requests"] >= 10
    assert summary["tokens"] == 15 * summary["requests"]
    assert (Path(summary["run_dir"]) / "story.md").read_text(encoding="utf-8").strip()
    assert all(r.headers.get("authorization") == "Bearer sk-env-llm-test-key"
               for r in model.requests[-summary["requests"]:])


def test_the_environment_reaches_sub_workflows(tmp_path: Path, model: FakeLLM) -> None:
    summary = run(tmp_path, model, "novella.yaml", "-i", "chapters=3")
    assert summary["status"] == "succeeded"
    runs = json.loads(run_cli("runs", "--all", "--json", state_dir=tmp_path / "state").stdout)
    children = [r for r in runs if r["parent_run"]]
    assert children
    for child in children:
        shown = run_cli("show", child["run_id"], "--json", state_dir=tmp_path / "state")
        doc = json.loads(shown.stdout)
        assert doc["environment"] == "llm"


def test_batch_rows_carry_their_tokens_and_the_run_totals_its_children(
    tmp_path: Path, model: FakeLLM
) -> None:
    summary = run(tmp_path, model, "batch.yaml")
    assert summary["status"] == "succeeded"
    # Every model call was made by a child run; the parent's totals include them all.
    assert summary["tokens"] == 15 * summary["requests"]
    table = (Path(summary["run_dir"]) / "summary.md").read_text(encoding="utf-8")
    rows = [line for line in table.splitlines() if line.startswith("| ") and "succeeded" in line]
    assert rows
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert int(cells[-2]) > 0  # tokens of that story
