"""Which executor a run uses: `--executor` over the workflow's `executor:` (no cluster)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from storyflow.engine.executors import LOCAL, LOCAL_SETTING, Setting, open_executor, setting
from storyflow.errors import UsageError
from storyflow.spec import load_workflow


@pytest.mark.parametrize(
    ("written", "option", "expected"),
    [
        (None, None, LOCAL_SETTING),
        ("local", None, LOCAL_SETTING),
        ({"local": {}}, None, LOCAL_SETTING),
        ("dask", None, Setting(kind="dask")),
        ({"dask": {"workers": 3, "threads": 2}}, None,
         Setting(kind="dask", workers=3, threads=2)),
        ({"dask": {"address": "tcp://h:8786", "connect_timeout": "2s"}, "llm": "workers"},
         None,
         Setting(kind="dask", address="tcp://h:8786", llm_on_workers=True,
                 connect_timeout_s=2.0)),
        ({"dask": {"address": "tcp://h:8786"}}, "local", LOCAL_SETTING),
        ({"dask": {"workers": 2}}, "dask", Setting(kind="dask", workers=2)),
        (None, "tcp://10.0.0.5:8786", Setting(kind="dask", address="tcp://10.0.0.5:8786")),
        ({"dask": {"address": "tcp://a:1", "connect_timeout": "1s"}}, "tls://b:2",
         Setting(kind="dask", address="tls://b:2", connect_timeout_s=1.0)),
    ],
)
def test_the_option_wins_over_the_file(written: Any, option: str | None,
                                       expected: Setting) -> None:
    assert setting(written, option) == expected


@pytest.mark.parametrize("option", ["kubernetes", "tcp://", ""])
def test_a_bad_option_is_a_usage_error(option: str) -> None:
    with pytest.raises(UsageError, match="--executor"):
        setting(None, option)


def test_local_hands_each_attempt_to_the_agent_itself() -> None:
    assert open_executor(LOCAL_SETTING) is LOCAL
    agent = object()
    assert LOCAL.agent("python", agent) is agent  # type: ignore[arg-type]


def test_an_environment_switches_the_executor(tmp_path: Path) -> None:
    path = tmp_path / "wf.yaml"
    path.write_text(
        "apiVersion: storyflow/v1\n"
        "name: x\n"
        "environments:\n"
        "  cluster: {executor: {dask: {address: 'tcp://10.0.0.5:8786'}, llm: workers}}\n"
        "steps:\n"
        "  a: {uses: template, with: {template: hi}}\n",
        encoding="utf-8",
    )
    assert setting(load_workflow(path).executor) == LOCAL_SETTING
    chosen = setting(load_workflow(path, environment="cluster").executor)
    assert chosen == Setting(kind="dask", address="tcp://10.0.0.5:8786", llm_on_workers=True)
    assert chosen.describe() == "dask tcp://10.0.0.5:8786"


@pytest.mark.parametrize("address", ["tcp://h:99999", "tcp://[::1", "tcp://host:port"])
def test_a_malformed_scheduler_address_in_the_workflow_is_a_usage_error(address: str) -> None:
    with pytest.raises(UsageError, match=r"^executor\.dask\.address .* is not a scheduler"):
        setting({"dask": {"address": address}})
    # the command line's address replaces the file's, and is what is checked then
    assert setting({"dask": {"address": address}}, "tcp://127.0.0.1:8786").address \
        == "tcp://127.0.0.1:8786"
