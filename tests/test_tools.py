"""Tool calling: the parser, the checks, the prompt, and calls through the Runner and the HTTP
server with the official openai client."""
from __future__ import annotations

import json

import pytest

from mistral_ref.api_types import ChatCompletionRequest
from mistral_ref.errors import InvalidRequestError
from mistral_ref.runner import Runner, Which
from mistral_ref.synth import synth_model
from mistral_ref.tools import SYSTEM_PROMPT, call_grammar, check_tools, parse_tool_calls, with_tools

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}},
                   "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {}, "additionalProperties": False}}}  # {} only: a random model ends it
TOOLS = check_tools([WEATHER, TIME], None)
ASK = [{"role": "user", "content": "Weather in Oslo?"}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Runner:
    path = tmp_path_factory.mktemp("tools") / "tiny.gguf"
    synth_model(path, "tiny", "Q4_K_M", seed=0, progress=False)
    return Runner(Which.GGUF(str(path)))


@pytest.mark.parametrize("text, content, calls", [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>', None,
     [("get_weather", {"city": "Oslo"})]),
    ('Checking.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'
     '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>', "Checking.",
     [("get_weather", {"city": "Paris"}), ("get_time", {})]),
    ('[TOOL_CALLS][{"name": "get_time", "arguments": {}}]', None, [("get_time", {})]),
    ('{"name": "get_weather", "arguments": {"city": "Oslo"}}', None, [("get_weather", {"city": "Oslo"})]),
    ('<tool_call>{"name": "launch", "arguments": {}}</tool_call>', "same", []),  # not a declared tool
    ('<tool_call>{"name": "get_time", "arguments": {</tool_call>', "same", []),  # not JSON
    ("It is sunny.", "same", []),
])
def test_parse_tool_calls(text, content, calls):
    got_content, got = parse_tool_calls(text, TOOLS)
    assert got_content == (text if content == "same" else content)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got] == calls
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in got)
    assert len({c["id"] for c in got}) == len(got)


def test_checks():
    with pytest.raises(InvalidRequestError, match="needs tools"):
        check_tools(None, "required")
    with pytest.raises(InvalidRequestError, match="tools"):
        check_tools([{"type": "function", "function": {}}], None)
    with pytest.raises(InvalidRequestError, match="declared"):
        check_tools([WEATHER], {"type": "function", "function": {"name": "get_time"}})
    with pytest.raises(InvalidRequestError, match="tool_choice"):
        check_tools([WEATHER], "always")
    assert check_tools([WEATHER], {"type": "function", "function": {"name": "get_weather"}}).choice == "get_weather"
    with pytest.raises(InvalidRequestError, match="grammar"):
        ChatCompletionRequest(ASK, tool_schemas=[WEATHER], tool_choice="required", grammar="a", grammar_type="regex")
    schema = json.loads(call_grammar(check_tools([WEATHER, TIME], "required")))
    assert [c["properties"]["name"]["const"] for c in schema["anyOf"]] == ["get_weather", "get_time"]


def test_prompt_shows_tools_and_earlier_calls():
    call = {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
    history = [{"role": "system", "content": "Be brief."}, *ASK,
               {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "c1", "content": "12:00"}]
    plain = with_tools(history, TOOLS, "{{ messages }}")
    assert plain[0]["content"].startswith("Be brief.\n\n" + SYSTEM_PROMPT[:20]) and "get_weather" in plain[0]["content"]
    assert plain[2]["content"] == '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    assert plain[3] == {"role": "user", "content": "<tool_response>\n12:00\n</tool_response>"}
    assert with_tools(ASK, TOOLS, "{{ messages }}")[0]["role"] == "system"
    aware = with_tools(history, TOOLS, "{% for t in tools %}{% endfor %}{{ m.tool_calls }}")
    assert aware[0]["content"] == "Be brief." and aware[2]["content"] is None


def test_runner_prompt_has_the_tools(tiny):
    ids = tiny._chat_prompt(ASK, TOOLS)
    text = tiny.tokenizer.decode(ids)
    assert "get_weather" in text and "<tools>" in text and "Weather in Oslo?" in text


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_calls_are_valid(tiny, choice):
    for stream in (False, True):
        request = ChatCompletionRequest(ASK, max_tokens=120, temperature=1.0, seed=2, n_choices=2,
                                        tool_schemas=[WEATHER, TIME], tool_choice=choice, stream=stream)
        got = tiny.send_chat_completion_request(request)
        if stream:
            chunks = list(got)
            assert all(c.choices[0].delta.tool_calls for c in chunks)  # one chunk per choice, at its end
            replies = [(c.choices[0].finish_reason, c.choices[0].delta.tool_calls) for c in chunks]
        else:
            replies = [(c.finish_reason, c.message.tool_calls) for c in got.choices]
            assert all(c.message.content is None for c in got.choices)
        assert len(replies) == 2
        for finish, calls in replies:
            assert finish == "tool_calls" and len(calls) == 1
            name, arguments = calls[0]["function"]["name"], json.loads(calls[0]["function"]["arguments"])
            assert name in (["get_weather", "get_time"] if choice == "required" else ["get_weather"])
            if name == "get_weather":
                assert arguments in ({"city": "Paris"}, {"city": "Oslo"})


def test_auto_streams_ordinary_text(tiny):
    """With tool_choice auto a reply that is not a call still streams token by token."""
    request = ChatCompletionRequest(ASK, max_tokens=8, temperature=0, tool_schemas=[WEATHER])
    plain = tiny.send_chat_completion_request(request)
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].finish_reason == "length"
    request.stream = True
    chunks = list(tiny.send_chat_completion_request(request))
    assert len(chunks) >= 4
    assert "".join(c.choices[0].delta.content for c in chunks) == plain.choices[0].message.content
