"""What a client is sent: full response bodies, SSE chunks, usage, finish reasons and the exit object."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from lynx_exit.serve.generation import Generation
from lynx_exit.serve.planning import RequestPlan
from lynx_exit.serve.protocol import APIError
from lynx_exit.serve.text import ChoiceText
from lynx_exit.serve.worker import Finish

logger = logging.getLogger(__name__)


def finish_reason(text: ChoiceText, finish: Finish) -> str:
    """OpenAI's finish reason: a forced exit's answer and a stop string end with "stop" too."""
    if text.stopped:
        return "stop"
    return "length" if finish.result.finish_reason == "length" else "stop"


def exit_object(finish: Finish, method: str, settings: dict[str, Any]) -> dict[str, Any]:
    result = finish.result
    return {
        "exited": result.exit_index is not None,
        "token_index": result.exit_index,
        "cue": finish.exit_cue,
        "point": result.exit_point,  # the decision point kind of the exit (cue, answer, paragraph)
        "gave_up": result.gave_up,  # the exit was a give-up: the trace was judged lost
        "score": finish.exit_score,
        "method": method,
        "settings": settings,
        "reasoning_tokens": result.reasoning_tokens,
    }


def usage(prompt_tokens: int, finishes: list[Finish]) -> dict[str, Any]:
    completion = sum(len(f.result.token_ids) for f in finishes)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "completion_tokens_details": {"reasoning_tokens": sum(f.result.reasoning_tokens for f in finishes)},
    }


def now() -> int:
    return int(time.time())


def full_response(
    generation: Generation, plan: RequestPlan, meta: dict[str, Any], chat: bool, prompt_tokens: int
) -> dict[str, Any]:
    choices = []
    for i, text in enumerate(generation.texts):
        finish = generation.finishes[i]
        choice: dict[str, Any] = {
            "index": i,
            "finish_reason": finish_reason(text, finish),
            "exit": exit_object(finish, plan.exit.method, plan.exit.settings),
        }
        if chat:
            choice["message"] = {
                "role": "assistant",
                "content": text.content,
                "reasoning_content": text.reasoning or None,
            }
        else:
            choice.update(text=text.content, logprobs=None)
        choices.append(choice)
    return {
        **meta,
        "object": "chat.completion" if chat else "text_completion",
        "choices": choices,
        "usage": usage(prompt_tokens, list(generation.finishes.values())),
    }


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def stream(
    generation: Generation,
    plan: RequestPlan,
    meta: dict[str, Any],
    chat: bool,
    prompt_tokens: int,
    include_usage: bool,
    points: bool = False,
) -> AsyncIterator[str]:
    """The SSE chunks of a streamed response; `points` (stream_options.lynx_decision_points) adds each
    decision point to its chunk (`lynx_points`) and, at the end, the tokens the exit saved against
    max_tokens."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    head = {**meta, "object": kind}
    try:
        if chat:  # the role first, at once: the client sees the response start even while queued
            yield "".join(
                sse(
                    {
                        **head,
                        "choices": [
                            {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                        ],
                    }
                )
                for i in range(len(generation.texts))
            )
        async for updates in generation.updates():
            out = []
            for update in updates:
                text = generation.texts[update.choice]
                if update.reasoning or update.content or update.points:
                    if chat:
                        delta = {
                            k: v
                            for k, v in (("reasoning_content", update.reasoning), ("content", update.content))
                            if v
                        }
                        choice: dict[str, Any] = {
                            "index": update.choice,
                            "delta": delta,
                            "finish_reason": None,
                        }
                    else:
                        choice = {
                            "index": update.choice,
                            "text": update.content,
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    if update.points:
                        choice["lynx_points"] = update.points
                    out.append(sse({**head, "choices": [choice]}))
                if update.finish is not None:
                    last: dict[str, Any] = {
                        "index": update.choice,
                        "finish_reason": finish_reason(text, update.finish),
                        "exit": exit_object(update.finish, plan.exit.method, plan.exit.settings),
                    }
                    if points:  # what the exit saved against the request's token budget
                        written = len(update.finish.result.token_ids)
                        last["exit"]["tokens_saved_vs_max_tokens"] = max(
                            0, plan.config.max_new_tokens - written
                        )
                    if chat:
                        last["delta"] = {}
                    else:
                        last.update(text="", logprobs=None)
                    out.append(sse({**head, "choices": [last]}))
            yield "".join(out)
        if include_usage:
            yield sse(
                {**head, "choices": [], "usage": usage(prompt_tokens, list(generation.finishes.values()))}
            )
        yield "data: [DONE]\n\n"
    except APIError as exc:  # the status line has gone out: report the failure in the stream
        yield sse(exc.body())
        yield "data: [DONE]\n\n"
    except Exception as exc:  # a fault of ours mid-stream: the client still gets an error event and the end
        logger.error(
            "unhandled %s in a stream: %s",
            type(exc).__name__,
            exc,
            exc_info=logger.isEnabledFor(logging.DEBUG),
        )
        yield sse(
            APIError(
                500, f"internal error ({type(exc).__name__})", kind="server_error", code="internal_error"
            ).body()
        )
        yield "data: [DONE]\n\n"
    finally:
        generation.cancel()  # a client that went away: abort what still runs (a no-op once all finished)
