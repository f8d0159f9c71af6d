"""Tool (function) calling, as OpenAI's chat API and mistral.rs's `tool_schemas` / `tool_choice`.

The model sees the tools either through its chat template (templates that read a `tools`
variable, as Mistral's and Qwen's do) or, for templates that do not, through a system prompt in
the Hermes format that SmolLM2 and Qwen were trained on (`SYSTEM_PROMPT`). What it writes back is
read by `parse_tool_calls`: `<tool_call>{"name", "arguments"}</tool_call>` blocks (SmolLM2, Qwen,
Hermes), Mistral's `[TOOL_CALLS]` followed by a JSON list, or a bare call object. A stream holds
its text back only while it may still be a call (`may_be_call`: it starts with one's marker), so
ordinary replies stream as usual; a call after some text is found in the whole reply only. With
tool_choice "required" or a named function the output is constrained by a grammar
(`call_grammar`): one JSON call of a declared tool whose arguments match its parameters schema.
"""
from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from mistral_ref.errors import InvalidRequestError

SYSTEM_PROMPT = (
    "You may call one or more functions to assist with the user query. You are provided with "
    "function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\nFor each "
    "function call, return a json object with function name and arguments within <tool_call>"
    "</tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}}\n</tool_call>")
_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_MISTRAL = "[TOOL_CALLS]"


SEARCH_TOOL = "search_the_web"  # offered with a request's web_search_options (mistral_ref.agentic)
SEARCH_DESCRIPTION = "Search the web for current information; returns results with their content."


def search_tool(description: str | None = None) -> dict[str, Any]:
    """The web-search tool offered to the model when a request has web_search_options."""
    return {"type": "function", "function": {
        "name": SEARCH_TOOL, "description": description or SEARCH_DESCRIPTION,
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}},
                       "required": ["query"]}}}


class ToolChoice(Enum):
    """mistral.rs's `ToolChoice` (the strings and objects of OpenAI's tool_choice work too)."""

    NoTools = "None"
    Auto = "Auto"


@dataclass(frozen=True)
class ToolSet:
    """A request's checked tools and tool_choice: `functions` (name -> parameters schema),
    `choice` ("none", "auto", "required", or the one function's name)."""

    tools: list[dict[str, Any]]
    functions: dict[str, dict[str, Any]]
    choice: str

    @property
    def forced(self) -> bool:
        """Whether the output must be a call (tool_choice "required" or a named function)."""
        return self.choice not in ("none", "auto")


def check_tools(tools: Any, tool_choice: Any) -> ToolSet | None:
    """OpenAI's `tools` (mistral.rs: tool_schemas) and `tool_choice` as a ToolSet; None when no
    tools are given. Raises InvalidRequestError naming the field."""
    if isinstance(tool_choice, ToolChoice):
        tool_choice = tool_choice.value.lower()
    if tools is None:
        if tool_choice not in (None, "none"):
            raise InvalidRequestError("tool_choice", "needs tools")
        return None
    if not isinstance(tools, list) or not tools:
        raise InvalidRequestError("tools", f"must be a non-empty list of tools, got {tools!r}")
    functions: dict[str, dict[str, Any]] = {}
    tools = [_parsed(tool) for tool in tools]
    for tool in tools:
        function = tool.get("function") if isinstance(tool, Mapping) and tool.get("type") == "function" else None
        name = function.get("name") if isinstance(function, Mapping) else None
        if not isinstance(name, str) or not name:
            raise InvalidRequestError("tools", f'each tool must be {{"type": "function", "function": '
                                               f'{{"name": ..., "parameters": {{...}}}}}}, got {tool!r}')
        parameters = function.get("parameters", {"type": "object"})
        if not isinstance(parameters, Mapping):
            raise InvalidRequestError("tools", f"the parameters of {name!r} must be a JSON schema object")
        functions[name] = dict(parameters)
    choice = "auto" if tool_choice is None else tool_choice
    if isinstance(choice, Mapping):
        named = choice.get("function", {}).get("name") if isinstance(choice.get("function"), Mapping) else None
        if choice.get("type") != "function" or named not in functions:
            raise InvalidRequestError("tool_choice", f"names no declared function (declared: "
                                                     f"{', '.join(functions)}), got {tool_choice!r}")
        choice = named
    elif choice not in ("none", "auto", "required"):
        raise InvalidRequestError("tool_choice", f'must be "none", "auto", "required" or '
                                                 f'{{"type": "function", "function": {{"name": ...}}}}, got {tool_choice!r}')
    return ToolSet([dict(t) for t in tools], functions, choice)


def _parsed(tool: Any) -> Any:
    """A tool, or mistral.rs's form of one: its JSON text."""
    if not isinstance(tool, str):
        return tool
    try:
        return json.loads(tool)
    except json.JSONDecodeError as e:
        raise InvalidRequestError("tool_schemas", f"a tool schema is not valid JSON ({e}): {tool[:80]!r}") from None


def with_tools(messages: Sequence[Mapping[str, Any]], tools: ToolSet | None,
               template: str) -> list[dict[str, Any]]:
    """The messages a template without tool support needs to see the tools (None: none offered
    now) and earlier calls: the tools in a system prompt (added to the first system message, or a
    new one), assistant `tool_calls` written as <tool_call> blocks, `tool` results as a user turn
    of <tool_response> blocks. A template that reads `tools` (or `tool_calls`) gets them as they are."""
    out: list[dict[str, Any]] = []
    for m in map(dict, messages):
        if m.get("tool_calls") and "tool_calls" not in template:
            calls = "\n".join(f"<tool_call>\n{json.dumps(_call_json(c))}\n</tool_call>" for c in m["tool_calls"])
            m["content"] = (m.get("content") or "") + calls
        if m.get("role") == "tool" and "tools" not in template:  # results as a user turn (Hermes)
            response = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            if out and out[-1].get("role") == "user" and out[-1]["content"].startswith("<tool_response>"):
                out[-1]["content"] += "\n" + response
                continue
            m = {"role": "user", "content": response}
        out.append(m)
    if tools is None or "tools" in template:
        return out
    described = SYSTEM_PROMPT.format(tools="\n".join(json.dumps(t) for t in tools.tools))
    if out and out[0].get("role") == "system":
        out[0]["content"] = f"{out[0]['content']}\n\n{described}"
    else:
        out.insert(0, {"role": "system", "content": described})
    return out


def _call_json(call: Mapping[str, Any]) -> dict[str, Any]:
    """An OpenAI tool call {id, type, function: {name, arguments: JSON text}} as the model wrote it."""
    function = call.get("function", {})
    arguments = function.get("arguments", "{}")
    try:
        arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
    except ValueError:
        pass
    return {"name": function.get("name"), "arguments": arguments}


def call_grammar(tools: ToolSet) -> str:
    """A JSON schema (text, for grammar_type "json_schema") admitting exactly one call
    {"name": <declared>, "arguments": <its parameters>} of the allowed tools."""
    names = list(tools.functions) if tools.choice == "required" else [tools.choice]
    calls = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
              "properties": {"name": {"const": name}, "arguments": tools.functions[name]}}
             for name in names]
    return json.dumps({"x-guidance": {"whitespace_flexible": False}, "anyOf": calls})


def parse_tool_calls(text: str, tools: ToolSet) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, calls) read from a model's output: the OpenAI tool calls it wrote for declared
    tools ({id, type, function: {name, arguments}}) and the text outside them (None when empty).
    Output that holds no well-formed call of a declared tool is all content."""
    found: list[Any] = []
    rest = text
    if _MISTRAL in text:
        head, _, tail = text.partition(_MISTRAL)
        found, rest = _json_or_none(tail.strip()), head
        found = found if isinstance(found, list) else [found]
    elif _TAGGED.search(text):
        found = [_json_or_none(block) for block in _TAGGED.findall(text)]
        rest = _TAGGED.sub("", text)
    else:
        found, rest = [_json_or_none(text.strip())], ""
    calls = [_openai_call(c) for c in found if _is_call(c, tools)]
    if not calls or len(calls) != len(found):
        return text, []
    return (rest.strip() or None), calls


def may_be_call(text: str) -> bool:
    """Whether output beginning with `text` may still turn out to be tool calls (it starts, or
    may start, with a call's marker): a stream holds such text back until it knows."""
    head = text.lstrip()
    return not head or any(head.startswith(m) or m.startswith(head) for m in (_MISTRAL, "<tool_call>", "{"))


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _is_call(value: Any, tools: ToolSet) -> bool:
    return (isinstance(value, dict) and value.get("name") in tools.functions
            and isinstance(value.get("arguments", value.get("parameters", {})), dict))


def _openai_call(value: dict[str, Any]) -> dict[str, Any]:
    arguments = value.get("arguments", value.get("parameters", {}))
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": value["name"], "arguments": json.dumps(arguments)}}
