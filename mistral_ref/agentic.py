"""Tool calls the engine answers itself: mistral.rs's `Runner(tool_callbacks=...)` and
`Runner(enable_search=True, search_callback=...)` with a request's `web_search_options`.

A chat request runs as rounds. When a round's reply calls a tool that has a callback, the engine
calls it, appends the call and its result to the conversation (an assistant message with
`tool_calls`, then a `tool` message) and runs the next round; the first round whose reply calls
no such tool is the answer. As in mistral.rs: only the first call of a reply is executed, at most
`max_tool_rounds` rounds run (default 256), and the usage adds up over the rounds. A streamed
request streams every round's text; a round's tool-call chunk, which the engine consumes, is not
passed on.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from mistral_ref.api_types import (ChatCompletionChunkResponse, ChatCompletionRequest,
                                   ChatCompletionResponse, sum_usage)
from mistral_ref.chat_template import message_dicts
from mistral_ref.errors import InvalidRequestError

DEFAULT_MAX_TOOL_ROUNDS = 256  # mistral.rs's
ToolCallback = Callable[[str, dict], str]


def search_callback_tool(search: Callable[[str], list[dict[str, str]]]) -> ToolCallback:
    """A tool callback that runs `search(query)` and gives the model its results as JSON."""
    def call(name: str, arguments: dict) -> str:
        results = search(str(arguments.get("query", "")))
        return json.dumps(list(results), ensure_ascii=False)
    return call


class ToolRounds:
    """Runs a chat request's rounds against `send(request)` (one round: the Runner's plain
    send_chat_completion_request), calling `callbacks` (tool name -> callback)."""

    def __init__(self, send: Callable[[ChatCompletionRequest], Any], callbacks: Mapping[str, ToolCallback],
                 request: ChatCompletionRequest, extra_tools: list[dict[str, Any]]):
        self.send, self.callbacks = send, dict(callbacks)
        tools = [*(request.tool_schemas or []), *extra_tools]
        self.request = dataclasses.replace(request, tool_schemas=tools or None)
        self.messages = message_dicts(request.messages)
        self.max_rounds = (DEFAULT_MAX_TOOL_ROUNDS if request.max_tool_rounds is None
                           else request.max_tool_rounds)

    def response(self) -> ChatCompletionResponse:
        usages = []
        for round_ in range(self.max_rounds + 1):
            response = self.send(self._round())
            usages.append(response.usage)
            calls = response.choices[0].message.tool_calls
            if round_ == self.max_rounds or not self._answer(calls):
                return dataclasses.replace(response, usage=sum_usage(usages, sequential=True))
        raise AssertionError("unreachable")

    def chunks(self) -> Iterator[ChatCompletionChunkResponse]:
        for round_ in range(self.max_rounds + 1):
            consumed = False
            for chunk in self.send(self._round()):
                calls = chunk.choices[0].delta.tool_calls if chunk.choices else None
                if calls and round_ < self.max_rounds and self._answer(calls):
                    consumed = True
                    continue
                yield chunk
            if not consumed:
                return

    def _round(self) -> ChatCompletionRequest:
        return dataclasses.replace(self.request, messages=list(self.messages))

    def _answer(self, calls: list[dict[str, Any]] | None) -> bool:
        """Run the first call when it has a callback, and add it and its result to the
        conversation; False when there is nothing the engine answers."""
        if not calls or calls[0]["function"]["name"] not in self.callbacks:
            return False
        call = {k: v for k, v in calls[0].items() if k != "index"}
        name, text = call["function"]["name"], call["function"]["arguments"]
        try:
            arguments = json.loads(text)
        except json.JSONDecodeError:
            arguments = {}
        result = self.callbacks[name](name, arguments if isinstance(arguments, dict) else {})
        if not isinstance(result, str):
            raise InvalidRequestError("tool_callbacks", f"the callback of {name!r} returned "
                                                        f"{type(result).__name__}, not a str")
        self.messages += [{"role": "assistant", "content": None, "tool_calls": [call]},
                          {"role": "tool", "tool_call_id": call["id"], "name": name, "content": result}]
        return True
