"""A step's rendered inputs: its ``with`` (and ``prompt``) with the run's names, and the
secrets its agent declares — for the step's own agent or a fallback serving it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from storyflow.errors import PermanentError
from storyflow.spec.model import Agent

if TYPE_CHECKING:
    from storyflow.engine.instance import Instance
    from storyflow.engine.scope import Scope


class Server(Protocol):
    """What serving a step needs: a `Step` (its own agent) or a `Fallback` has it."""

    @property
    def agent(self) -> str | None: ...
    @property
    def uses(self) -> str | None: ...
    @property
    def with_(self) -> dict[str, Any]: ...
    @property
    def retry(self) -> Any: ...
    @property
    def timeout_s(self) -> float | None: ...
    @property
    def pool(self) -> str | None: ...


class Inputs:
    """Renders what each attempt of a run is called with."""

    __slots__ = ("agents", "environ", "scope", "templates")

    def __init__(self, scope: Scope, templates: Any, agents: Mapping[str, Agent],
                 environ: Mapping[str, str]) -> None:
        self.scope = scope
        self.templates = templates
        self.agents = agents
        self.environ = environ

    def for_server(self, inst: Instance, server: Server) -> tuple[dict[str, Any], dict[str, str]]:
        """The rendered ``with`` (and ``prompt``) of a server of ``inst``, and its secrets."""
        agent = self.agents.get(server.agent) if server.agent else None
        secrets = {}
        for name in agent.secrets if agent else ():
            value = self.environ.get(name)
            if value is None:
                raise PermanentError(
                    f"secret {name} is not set", hint=f"export {name}=... before running"
                )
            secrets[name] = value
        scope = self.scope.for_step(secrets, inst.extra)
        inputs = self.templates.render(server.with_, scope) if server.with_ else {}
        prompt = inst.node.step.prompt
        if prompt is not None:
            inputs["prompt"] = self.templates.render(prompt, scope)
        return inputs, secrets
