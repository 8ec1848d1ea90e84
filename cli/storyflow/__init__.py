"""storyflow: a YAML-driven orchestrator for multi-agent LLM story pipelines.

The public Python surface is small: agents raise `TransientError` to ask for a retry.
Everything else is reached through the `storyflow` command.
"""

from storyflow.errors import PermanentError, StoryflowError, TransientError

__all__ = ["PermanentError", "StoryflowError", "TransientError", "__version__"]

__version__ = "0.1.0"
