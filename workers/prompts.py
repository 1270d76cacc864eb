"""Which prompts a sampler can serve: the checks made before a prompt reaches the engine.

A prompt that fails them is dead-lettered with the reason, never retried by another sampler of
the same configuration (it would fail there too) and never allowed to stop the sampler.
"""

from __future__ import annotations

from pipeline.treepo.tasks import reward_fn
from pipeline.wire.messages import PromptTask


def prompt_problem(
    task: PromptTask, default_task: str, context_tokens: int, response_cap: int
) -> tuple[str, str] | None:
    """(reason, detail) when ``task`` cannot be served by an engine of ``context_tokens``
    growing responses of up to ``response_cap`` tokens, else None."""
    name = task.task or default_task
    try:
        reward_fn(name)
    except ValueError as exc:
        return "unknown_task", str(exc)
    n = len(task.prompt_token_ids)
    if not n or n + response_cap > context_tokens:
        return "too_long", (
            f"prompt {task.prompt_id} of {n} tokens + response cap {response_cap} does not fit "
            f"the engine's context of {context_tokens} tokens"
        )
    return None
