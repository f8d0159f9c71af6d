"""The OpenAI-compatible server, as a client sees it: a real `mistral-ref serve` process on a free
loopback port, driven by the official `openai` client and by raw HTTP (httpx).

The reference for every generated text is the Runner called in this process on the same file:
greedy decoding is deterministic, so the server must hand back exactly what the Runner makes.
Model: the tiny random Mistral (real Mistral v1 tokenizer), so each request takes well under 1 s.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from mistral_ref.api_types import ChatCompletionRequest, CompletionRequest  # noqa: E402
from mistral_ref.runner import Runner, Which  # noqa: E402
from mistral_ref.synth import synth_model  # noqa: E402

API_KEY = "sk-test"
# uvicorn shuts down gracefully, then re-raises the signal so the exit status says what ended it
GRACEFUL = (0, -signal.SIGTERM)
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
# The openai client validates responses with pydantic, which warns (UserWarning) about a field of
# the wrong type: any such warning on our responses fails the test.
pytestmark = pytest.mark.filterwarnings("error::UserWarning")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m mistral_ref.cli serve ...` on a free port, ready once /health answers."""

    def __init__(self, model: Path, *args: str, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mistral_ref.cli", "serve", "--model", str(model),
             "--port", str(self.port), "--log-level", "warning", *args],
            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not start within 120 s")

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=5).json()

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("server") / "tiny.gguf"
    synth_model(path, "tiny", "Q4_K_M", sliding_window=16, seed=0, progress=False)
    return path


@pytest.fixture(scope="module")
def runner(model) -> Runner:
    return Runner(which=Which.GGUF(str(model)))


@pytest.fixture(scope="module")
def server(model):
    # a short keep-alive interval: the openai client must read through the comments
    s = ServerProcess(model, "--api-key", API_KEY, env={"KEEP_ALIVE_INTERVAL": "50"})
    yield s
    assert s.stop() in GRACEFUL


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def post(server, path: str, body, key: str | None = API_KEY, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + path, content=content, timeout=60,
                      headers={"Content-Type": "application/json", **headers}, **kw)


def sse_events(lines) -> list:
    """Parsed `data:` payloads of an SSE stream, "[DONE]" kept as a string; comments dropped."""
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:])
            for line in lines if line.startswith("data: ")]


def reference_chat(runner, **kw) -> dict:
    return runner.send_chat_completion_request(ChatCompletionRequest(messages=CHAT, temperature=0, **kw)).to_dict()


# -- the official client ---------------------------------------------------------------------------
def test_models_and_health(server, client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny.gguf"]
    assert client.models.retrieve("tiny.gguf").id == "tiny.gguf"
    assert server.health()["status"] == "ok"


def test_docs_work_offline(server):
    """/docs is Swagger UI whose script and style come from this server, not a CDN."""
    page = httpx.get(server.url + "/docs", timeout=10)
    assert page.status_code == 200 and "SwaggerUIBundle" in page.text
    assert "http://" not in page.text and "https://" not in page.text
    for asset in ("/static/swagger-ui/swagger-ui-bundle.js", "/static/swagger-ui/swagger-ui.css"):
        r = httpx.get(server.url + asset, timeout=10)
        assert r.status_code == 200 and len(r.content) > 10_000
    spec = httpx.get(server.url + "/openapi.json", timeout=10).json()
    assert spec["openapi"].startswith("3.1")  # Swagger UI 5 renders 3.1; the 4.x bundle does not
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health"} <= set(spec["paths"])


def refs(node) -> list[str]:
    """Every `$ref` in a JSON document."""
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "$ref"] + [r for v in node.values() for r in refs(v)]
    return [r for v in node for r in refs(v)] if isinstance(node, list) else []


def test_openapi_examples_and_response_schemas(server):
    """/docs shows a working example body per generation route and the response schemas, whose
    shared definitions all resolve."""
    spec = httpx.get(server.url + "/openapi.json", timeout=10).json()
    schemas = spec["components"]["schemas"]
    documented = [("/v1/chat/completions", "ChatCompletionResponse", "ChatCompletionChunkResponse"),
                  ("/v1/completions", "CompletionResponse", "CompletionResponse")]
    for path, response, chunk in documented:
        operation = spec["paths"][path]["post"]
        assert operation["requestBody"]["required"] is True
        example = operation["requestBody"]["content"]["application/json"]["example"]
        content = operation["responses"]["200"]["content"]
        assert content["application/json"]["schema"]["title"] == response
        assert content["text/event-stream"]["schema"]["title"] == chunk
        assert "choices" in content["application/json"]["schema"]["properties"]
        body = operation["requestBody"]["content"]["application/json"]["schema"]
        assert {"model", "max_tokens", "temperature", "stop", "stream", "response_format"} <= set(body["properties"])
        assert body["properties"]["temperature"]["default"] == 1 and body["properties"]["top_k"]["default"] == -1
        assert all(field["description"] for field in body["properties"].values())
        # the example is a request the server answers
        assert post(server, path, {**example, "max_tokens": 2}).json()["usage"]["completion_tokens"] == 2
    assert {"Choice", "ChunkChoice", "CompletionChoice", "Usage"} <= set(schemas)
    prefix = "#/components/schemas/"
    assert refs(spec) and all(r.startswith(prefix) and r[len(prefix):] in schemas for r in refs(spec))


def test_chat_matches_runner(client, runner):
    expected = reference_chat(runner, max_tokens=8)
    got = client.chat.completions.create(model="tiny.gguf", messages=CHAT, max_tokens=8, temperature=0)
    assert got.object == "chat.completion" and got.model == "tiny.gguf"
    assert got.choices[0].message.content == expected["choices"][0]["message"]["content"]
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].finish_reason == "length"
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (expected["usage"]["prompt_tokens"], 8)
    # the model may be named "" (mistral.rs's examples) and max_completion_tokens is OpenAI's newer name
    also = client.chat.completions.create(model="", messages=CHAT, max_completion_tokens=8, temperature=0)
    assert also.choices[0].message.content == got.choices[0].message.content


def test_streaming_chat(client, runner):
    expected = reference_chat(runner, max_tokens=8)
    chunks = list(client.chat.completions.create(model="tiny.gguf", messages=CHAT, max_tokens=8,
                                                 temperature=0, stream=True))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content for c in chunks) == expected["choices"][0]["message"]["content"]
    assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert chunks[-1].usage.completion_tokens == 8 and all(c.usage is None for c in chunks[:-1])
    # stream_options.include_usage: OpenAI's separate last chunk with no choices
    chunks = list(client.chat.completions.create(model="tiny.gguf", messages=CHAT, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == expected["usage"]["total_tokens"]
    assert all(c.usage is None for c in chunks[:-1])


def test_completions(client, runner):
    expected = runner.send_completion_request(
        CompletionRequest(prompt="The sky is", max_tokens=6, temperature=0)).to_dict()
    got = client.completions.create(model="tiny.gguf", prompt="The sky is", max_tokens=6, temperature=0)
    assert got.object == "text_completion"
    assert got.choices[0].text == expected["choices"][0]["text"]
    streamed = client.completions.create(model="tiny.gguf", prompt="The sky is", max_tokens=6,
                                         temperature=0, stream=True, echo=True)
    assert "".join(c.choices[0].text for c in streamed) == "The sky is" + expected["choices"][0]["text"]


def test_logprobs(client, runner):
    """OpenAI's types on HTTP (the openai client validates them: any warning fails the test);
    the values are the Runner's."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = client.chat.completions.create(model="tiny.gguf", messages=CHAT, max_tokens=5, temperature=0,
                                             logprobs=True, top_logprobs=3)
        content = got.choices[0].logprobs.content
        got.model_dump_json(warnings="error")
    expected = reference_chat(runner, max_tokens=5, logprobs=True, top_logprobs=3)
    assert len(content) == 5
    for token, ref in zip(content, expected["choices"][0]["logprobs"]["content"]):
        assert token.token == ref["token"] and token.logprob == pytest.approx(ref["logprob"], abs=1e-9)
        assert [(top.token, top.model_extra["id"]) for top in token.top_logprobs] == [
            (top["bytes"], top["token"]) for top in ref["top_logprobs"]]
        assert all(bytes(top.bytes) == runner.tokenizer.token_bytes(top.model_extra["id"])
                   for top in token.top_logprobs)
        # greedy: the chosen token is the most likely one
        assert token.logprob == pytest.approx(token.top_logprobs[0].logprob, abs=1e-12)


def test_content_parts(client, server):
    """OpenAI's list-of-parts content: text parts joined with newlines; any other part is a 400
    naming its type; an assistant turn with tool_calls may have content null."""
    parts = [{"role": "system", "content": [{"type": "text", "text": "You are"}, {"type": "text", "text": "terse."}]},
             CHAT[1]]
    joined = [{"role": "system", "content": "You are\nterse."}, CHAT[1]]
    got, want = (client.chat.completions.create(model="tiny.gguf", messages=m, max_tokens=5, temperature=0)
                 for m in (parts, joined))
    assert got.choices[0].message.content == want.choices[0].message.content
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    error = error_of(post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": [image]}]}), 400)
    assert "image_url" in error["message"] and error["param"] == "messages"
    call = {"role": "assistant", "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}
    assert post(server, "/v1/chat/completions", {"messages": [*CHAT, call], "max_tokens": 2}).status_code == 200


SCHEMA = {"type": "object", "x-guidance": {"whitespace_flexible": False},
          "properties": {"colour": {"enum": ["red", "green"]}, "n": {"type": "integer", "maximum": 9}},
          "required": ["colour", "n"], "additionalProperties": False}


def test_response_format_and_grammar_object(client, server):
    """response_format json_schema (the openai client's `response_format`) and mistral.rs's
    grammar object form constrain the output; json_object becomes the schema {"type": "object"};
    unknown types are 400s naming them."""
    got = client.chat.completions.create(
        model="tiny.gguf", messages=CHAT, max_tokens=40, temperature=1.0, seed=3,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": SCHEMA, "strict": True}})
    value = json.loads(got.choices[0].message.content)
    assert value["colour"] in ("red", "green") and 0 <= value["n"] <= 9 and set(value) == {"colour", "n"}
    for grammar in ({"type": "json_schema", "value": SCHEMA}, {"type": "regex", "value": "[0-9]{3}-[a-z]{2}"},
                    {"type": "llguidance", "value": {"grammars": [{"lark_grammar": 'start: "ab" /[0-9]/'}]}}):
        body = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 40, "seed": 1, "grammar": grammar})
        text = body.json()["choices"][0]["text"]
        if grammar["type"] == "json_schema":
            assert set(json.loads(text)) == {"colour", "n"}
        else:
            assert re.fullmatch("[0-9]{3}-[a-z]{2}" if grammar["type"] == "regex" else "ab[0-9]", text), text
    chat = "/v1/chat/completions"
    assert error_of(post(server, chat, {"messages": CHAT, "response_format": {"type": "xml"}}), 400)["param"] == "response_format"
    assert "xml" in error_of(post(server, chat, {"messages": CHAT, "response_format": {"type": "xml"}}), 400)["message"]
    assert error_of(post(server, chat, {"messages": CHAT, "grammar": {"type": "ebnf", "value": "x"}}), 400)["param"] == "grammar_type"
    assert error_of(post(server, chat, {"messages": CHAT, "grammar": {"kind": "regex"}}), 400)["param"] == "grammar"


def test_openai_body_to_grammar_fields():
    from mistral_ref.api_types import ChatCompletionRequest as Chat
    assert (Chat.from_openai({"messages": CHAT, "response_format": {"type": "json_object"}}).grammar_type,
            json.loads(Chat.from_openai({"messages": CHAT, "response_format": {"type": "json_object"}}).grammar)) == (
        "json_schema", {"type": "object", "x-guidance": {"whitespace_flexible": False}})
    assert Chat.from_openai({"messages": CHAT, "response_format": {"type": "text"}}).grammar is None
    plain = Chat.from_openai({"messages": CHAT, "grammar": "a+", "grammar_type": "regex"})
    assert (plain.grammar, plain.grammar_type) == ("a+", "regex")


def test_completion_prompt_lists(client, runner):
    """`prompt` as a list of strings, token ids, or lists of ids (langchain's OpenAI sends a list):
    prompt i's n choices are indexes i * n.., each the Runner's answer to that prompt alone."""
    prompts = ["The sky is", "Once upon"]
    alone = [runner.send_completion_request(CompletionRequest(prompt=p, max_tokens=4, temperature=0))
             for p in prompts]
    ids = [runner.tokenizer.encode(p, add_special_tokens=True) for p in prompts]
    for prompt in (prompts, ids, ids[0]):
        got = client.completions.create(model="x", prompt=prompt, max_tokens=4, temperature=0, n=2)
        n_prompts = 1 if prompt is ids[0] else 2
        assert [c.index for c in got.choices] == list(range(2 * n_prompts))
        assert [c.text for c in got.choices] == [a.choices[0].text for a in alone[:n_prompts] for _ in range(2)]
        assert got.usage.completion_tokens == 8 * n_prompts
        assert got.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone[:n_prompts])
    streamed = list(client.completions.create(model="x", prompt=prompts, max_tokens=4, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    texts = {}
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert texts == {i: a.choices[0].text for i, a in enumerate(alone)}
    assert [c.usage.completion_tokens for c in streamed if c.usage] == [8]
    bad = client.with_options(max_retries=0).completions
    with pytest.raises(openai.BadRequestError):
        bad.create(model="x", prompt=[[1, 10**9]], max_tokens=2)


def test_tool_calls(client):
    """Tools with the official client: a required call, a streamed one, and the next turn with
    the call (content null) and its result in the history."""
    weather = {"type": "function", "function": {
        "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}},
                                              "required": ["city"], "additionalProperties": False}}}
    ask = [{"role": "user", "content": "Weather in Oslo?"}]
    got = client.chat.completions.create(model="x", messages=ask, tools=[weather], tool_choice="required",
                                         max_tokens=120, seed=1)
    call = got.choices[0].message.tool_calls[0]
    assert got.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Oslo") and call.id.startswith("call_")
    streamed = list(client.chat.completions.create(model="x", messages=ask, tools=[weather], stream=True,
                                                   tool_choice="required", max_tokens=120, seed=1))
    deltas = [t for c in streamed for t in (c.choices[0].delta.tool_calls or [])]
    assert [d.function.name for d in deltas] == ["get_weather"] and deltas[0].index == 0
    assert streamed[-1].choices[0].finish_reason == "tool_calls"
    history = [*ask, got.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    after = client.chat.completions.create(model="x", messages=history, tools=[weather], max_tokens=4)
    assert after.choices[0].finish_reason in ("length", "stop", "tool_calls")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="x", messages=ask, tool_choice="required", max_tokens=4)


def test_structured_output_clients(server, client):
    """What users of instructor and langchain-openai run, unchanged, against this server:
    structured output through response_format json_schema and through a forced tool call, and
    langchain's completions model (it sends `prompt` as a list). Skips without those packages."""
    from typing import Literal

    from pydantic import BaseModel, ConfigDict, Field

    class Pick(BaseModel):
        # extra="forbid": additionalProperties false, so a random-weight model cannot wander off
        # into keys of its own until max_tokens (a trained model stops by itself)
        model_config = ConfigDict(extra="forbid")
        colour: Literal["red", "green"]
        n: int = Field(ge=0, le=9)

    instructor = pytest.importorskip("instructor")
    for mode in (instructor.Mode.JSON_SCHEMA, instructor.Mode.TOOLS):
        got = instructor.from_openai(client, mode=mode).chat.completions.create(
            model="x", messages=CHAT, response_model=Pick, max_tokens=60, max_retries=0)
        assert isinstance(got, Pick), mode
    langchain_openai = pytest.importorskip("langchain_openai")
    chat = langchain_openai.ChatOpenAI(base_url=server.url + "/v1", api_key=API_KEY, model="x",
                                       max_tokens=60, max_retries=0)
    for method in ("json_schema", "function_calling"):
        assert isinstance(chat.with_structured_output(Pick, method=method).invoke("Pick one."), Pick), method
    llm = langchain_openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, model="x", max_tokens=4,
                                  max_retries=0)
    assert isinstance(llm.invoke("The sky is"), str)


def test_async_client(server, runner):
    """The official AsyncOpenAI client: concurrent requests, streamed and not, as the Runner answers."""
    import asyncio
    expected = reference_chat(runner, max_tokens=6)["choices"][0]["message"]["content"]

    async def main() -> list[str]:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
        async def streamed() -> str:
            stream = await client.chat.completions.create(model="x", messages=CHAT, max_tokens=6, temperature=0,
                                                          stream=True, logprobs=True, top_logprobs=2)
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        async def whole() -> str:
            reply = await client.chat.completions.create(model="x", messages=CHAT, max_tokens=6, temperature=0)
            return reply.choices[0].message.content
        return await asyncio.gather(streamed(), whole(), streamed(), whole())
    assert asyncio.run(main()) == [expected] * 4


def test_completion_logprobs_are_the_legacy_object(client, runner):
    expected = runner.send_completion_request(CompletionRequest(
        prompt="The sky is", max_tokens=4, temperature=0, logprobs=2)).to_dict()["choices"][0]
    for stream in (False, True):
        got = client.completions.create(model="tiny.gguf", prompt="The sky is", max_tokens=4,
                                        temperature=0, logprobs=2, stream=stream)
        choices = [c.choices[0] for c in got] if stream else got.choices
        tokens = [t for c in choices for t in c.logprobs.tokens]
        assert tokens == [e["token"] for e in expected["logprobs"]["content"]]
        assert [lp for c in choices for lp in c.logprobs.token_logprobs] == pytest.approx(
            [e["logprob"] for e in expected["logprobs"]["content"]], abs=1e-9)
        tops = [t for c in choices for t in c.logprobs.top_logprobs]
        assert all(len(t) <= 2 and max(t.values()) == pytest.approx(lp, abs=1e-12)
                   for t, lp in zip(tops, [e["logprob"] for e in expected["logprobs"]["content"]]))
        offsets = [o for c in choices for o in c.logprobs.text_offset]
        assert offsets == [len("The sky is") + len("".join(tokens[:i])) for i in range(len(tokens))]


def test_n_choices_and_seed(client):
    got = client.chat.completions.create(model="tiny.gguf", messages=CHAT, max_tokens=6, n=2,
                                         temperature=1.0, seed=7)
    assert [c.index for c in got.choices] == [0, 1]
    assert got.usage.completion_tokens == 12
    again = client.chat.completions.create(model="tiny.gguf", messages=CHAT, max_tokens=6, n=2,
                                           temperature=1.0, seed=7)
    assert [c.message.content for c in again.choices] == [c.message.content for c in got.choices]


def test_stop_string(client, runner):
    text = reference_chat(runner, max_tokens=10)["choices"][0]["message"]["content"]
    stop = text[len(text) // 2:len(text) // 2 + 3]
    cut = text[:text.index(stop)]
    got = client.chat.completions.create(model="tiny.gguf", messages=CHAT, max_tokens=10, temperature=0, stop=stop)
    assert got.choices[0].message.content == cut and got.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model="tiny.gguf", messages=CHAT, max_tokens=10, temperature=0,
                                              stop=[stop, "\x00never"], stream=True)
    assert "".join(c.choices[0].delta.content for c in streamed) == cut


# -- bad input, raw HTTP ---------------------------------------------------------------------------
def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "Traceback" not in response.text
    return error


def test_bad_requests(server, client):
    chat = "/v1/chat/completions"
    ok = {"model": "tiny.gguf", "messages": CHAT, "max_tokens": 2}
    error_of(post(server, chat, b'{"messages": [{"role": "user", "content": "hi"}'), 422)
    error_of(post(server, chat, b"\xff\xfe not utf-8"), 422)
    assert error_of(post(server, chat, [1, 2]), 400)["param"] == "body"
    assert error_of(post(server, chat, {**ok, "messages": 5}), 400)["param"] == "messages"
    assert error_of(post(server, chat, {**ok, "temperature": "hot"}), 400)["param"] == "temperature"
    assert error_of(post(server, chat, {**ok, "max_tokens": -1}), 400)["param"] == "max_tokens"
    assert error_of(post(server, chat, {**ok, "top_p": 0}), 400)["param"] == "top_p"
    assert error_of(post(server, chat, {**ok, "n": 0}), 400)["param"] == "n_choices"
    assert error_of(post(server, chat, {**ok, "logit_bias": {"x": 1}}), 400)["param"] == "logit_bias"
    assert error_of(post(server, chat, {**ok, "logit_bias": {"99999999": 1}}), 400)["param"] == "logit_bias"
    assert error_of(post(server, chat, {**ok, "stream_options": 3}), 400)["param"] == "stream_options"
    assert error_of(post(server, chat, {**ok, "stream": True, "stop": [2**40]}), 400)["param"] == "stop_token_ids"
    assert error_of(post(server, "/v1/completions", {"prompt": ""}), 400)["param"] == "prompt"
    assert error_of(post(server, chat, {**ok, "model": 7}), 400)["param"] == "model"
    assert error_of(post(server, chat, {**ok, "stop": {"a": 1}}), 400)["param"] == "stop"
    assert error_of(post(server, chat, ok, key=None), 401)["code"] == "invalid_api_key"
    assert error_of(post(server, chat, ok, key="wrong"), 401)["code"] == "invalid_api_key"
    assert error_of(httpx.get(server.url + "/v1/models"), 401)["code"] == "invalid_api_key"
    error_of(post(server, "/v1/nothing", ok), 404)
    error_of(httpx.get(server.url + "/nothing"), 404)
    error_of(httpx.get(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"}), 405)
    error_of(post(server, chat, b"[" + b" " * (5 << 20) + b"]"), 413)
    # one model is served under any name (the seed's completions example asks for "mistral")
    for name in ("mistral", "gpt-4", "", "default"):
        response = post(server, chat, {**ok, "model": name})
        assert response.status_code == 200 and response.json()["model"] == "tiny.gguf"
    # stop as a token id or a list of them (mistral.rs), as a string or a list of strings (OpenAI)
    for stop in (2, [2, 3], "x", ["x", "y"]):
        assert post(server, chat, {**ok, "stop": stop}).status_code == 200, stop
        assert post(server, "/v1/completions", {"prompt": "a", "max_tokens": 2, "stop": stop}).status_code == 200
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny.gguf", messages=CHAT, temperature=-1)
    # unknown fields are ignored, as OpenAI does
    assert post(server, chat, {**ok, "user": "me", "tools_choice_whatever": [1]}).status_code == 200
    # max_tokens past the context after the prompt: a 400 in OpenAI's words (the Python API cuts
    # generation at the context instead); the prompt nearly fills the tiny model's 512 tokens
    prompt = "one two three " * 166
    for max_tokens in (10**30, 20):
        error = error_of(post(server, "/v1/completions", {"prompt": prompt, "max_tokens": max_tokens}), 400)
        assert error["param"] == "max_tokens" and "maximum context length is 512 tokens" in error["message"]
    body = post(server, "/v1/completions", {"prompt": prompt, "temperature": 0}).json()
    assert body["choices"][0]["finish_reason"] == "length"  # no max_tokens: up to the context
    assert body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"] == 512
    assert server.health()["status"] == "ok"
    assert post(server, chat, ok).json()["usage"]["completion_tokens"] == 2  # still serving


# -- concurrency ------------------------------------------------------------------------------------
def test_eight_concurrent_streams(server, client, runner):
    expected = reference_chat(runner, max_tokens=6)["choices"][0]["message"]["content"]
    texts, errors = [None] * 8, []

    def one(i: int) -> None:
        try:
            stream = client.chat.completions.create(model="tiny.gguf", messages=CHAT, max_tokens=6,
                                                    temperature=0, stream=True)
            texts[i] = "".join(c.choices[0].delta.content for c in stream)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    health_seconds = []
    while any(t.is_alive() for t in threads):
        start = time.perf_counter()
        assert server.health()["status"] == "ok"
        health_seconds.append(time.perf_counter() - start)
        time.sleep(0.05)
    for t in threads:
        t.join(60)
    assert not errors and texts == [expected] * 8
    assert max(health_seconds) < 2.0  # /health is not stuck behind generation


def test_concurrent_different_requests_equal_each_alone(server, runner):
    """Streamed and non-streamed chat and completion requests that differ in prompt, length,
    sampling, seed, n, stops and grammar, sent at once: the engine runs them in one batch, and
    each gets what the Runner makes of it alone (the q8 kernels give every sequence the same bits
    in any batch)."""
    user = lambda text: [{"role": "user", "content": text}]
    bodies = [
        ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 12, "temperature": 0}),
        ("/v1/chat/completions", {"messages": user("Tell me of ships."), "max_tokens": 20,
                                  "temperature": 0.8, "top_p": 0.9, "seed": 3, "n": 2, "stream": True}),
        ("/v1/chat/completions", {"messages": user("Count."), "max_tokens": 9, "temperature": 1.0, "seed": 5,
                                  "grammar": "[0-9]{1,6}", "grammar_type": "regex"}),
        ("/v1/chat/completions", {"messages": user("Go on"), "max_tokens": 30, "temperature": 1.0,
                                  "seed": 8, "stop": ["a"], "stream": True}),
        ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 15, "temperature": 0.9,
                             "seed": 4, "best_of": 3, "n": 2}),
        ("/v1/completions", {"prompt": "The sea", "max_tokens": 25, "temperature": 1.1, "top_k": 40,
                             "seed": 9, "stream": True}),
    ]

    def texts(path: str, body: dict) -> dict:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        if not body.get("stream"):
            r = post(server, path, body)
            assert r.status_code == 200, r.text
            return {c["index"]: c.get("text", c.get("message", {}).get("content")) for c in r.json()["choices"]}
        out = {}
        with httpx.stream("POST", server.url + path, json=body, timeout=60, headers=headers) as r:
            for event in sse_events(r.iter_lines()):
                for c in event["choices"] if isinstance(event, dict) else ():
                    out[c["index"]] = out.get(c["index"], "") + (c["text"] if "text" in c else c["delta"]["content"])
        return out

    def alone(path: str, body: dict) -> dict:
        body = {**body, "stream": False}
        if path == "/v1/completions":
            response = runner.send_completion_request(CompletionRequest.from_openai(body))
            return {c.index: c.text for c in response.choices}
        response = runner.send_chat_completion_request(ChatCompletionRequest.from_openai(body))
        return {c.index: c.message.content for c in response.choices}

    results, errors = [None] * len(bodies), []

    def one(i: int) -> None:
        try:
            results[i] = texts(*bodies[i])
        except Exception as e:  # reported below
            errors.append(e)
    steps = server.health()["steps"]
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert results == [alone(*b) for b in bodies]
    # batched: far fewer forward passes than the 175 tokens generated
    assert server.health()["steps"] - steps < 100


def test_a_non_streamed_request_is_cancelled_when_its_client_hangs_up(model):
    s = ServerProcess(model)
    try:
        with pytest.raises(httpx.ReadTimeout):
            # n=4: four sequences a step make the request take seconds, not a moment
            httpx.post(s.url + "/v1/completions", json={"prompt": "Once", "max_tokens": 500, "n": 4}, timeout=0.5)
        deadline = time.monotonic() + 20
        while s.health()["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        health = s.health()
        assert health["cancelled"] == 1 and health["running"] == 0
        assert health["steps"] < 400  # stopped well before its 500 tokens
    finally:
        assert s.stop() in GRACEFUL


def test_health_reports_the_prefix_cache(server, client):
    before = server.health()["prefix_cache"]
    messages = [{"role": "system", "content": "You answer in French. " * 8}, {"role": "user", "content": "Bonjour"}]
    for _ in range(2):
        client.chat.completions.create(model="tiny.gguf", messages=messages, max_tokens=3, temperature=0)
    after = server.health()["prefix_cache"]
    assert after["hits"] >= before.get("hits", 0) + 1
    assert after["reused_tokens"] - before.get("reused_tokens", 0) >= 50
    assert after["entries"] >= 1 and after["bytes"] > 0


def test_keep_alive_comments(model):
    """A stream waiting for a running slot gets `: keep-alive` comments (every 50 ms) until its
    turn, then its chunks, as the openai client expects."""
    s = ServerProcess(model, "--max-running", "1", env={"KEEP_ALIVE_INTERVAL": "50"})
    try:
        long = {"model": "tiny.gguf", "prompt": "Once", "max_tokens": 500, "stream": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=long, timeout=60) as first:
            first_lines = first.iter_lines()  # kept: a dropped iterator would close the connection
            next(line for line in first_lines if line.startswith("data: "))  # it holds the slot
            body = {"model": "tiny.gguf", "messages": CHAT, "max_tokens": 3, "stream": True}
            with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, timeout=60) as second:
                assert second.status_code == 200
                lines = list(second.iter_lines())
    finally:
        assert s.stop() in GRACEFUL
    assert lines[0] == ": keep-alive"
    events = sse_events(lines)
    assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 3


def test_disconnect_cancels_generation(server):
    body = {"model": "tiny.gguf", "prompt": "Once", "max_tokens": 500, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        n = 0
        for line in r.iter_lines():
            n += line.startswith("data: ")
            if n == 3:
                break
    start = server.health()["streamed_chunks"]
    deadline = time.monotonic() + 20
    while server.health()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    health = server.health()
    assert health["running"] == 0 and health["queued"] == 0
    # the engine stopped soon after the hang-up, far short of the 500 tokens asked for
    assert health["streamed_chunks"] - start < 100


def test_queue_full_and_graceful_shutdown(model):
    s = ServerProcess(model, "--max-queue", "0", "--max-running", "1", "--shutdown-timeout", "1",
                      "--log-level", "info")
    body = {"model": "tiny.gguf", "prompt": "Once", "max_tokens": 500, "stream": True}
    with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["object"] == "text_completion"
        busy = httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1}, timeout=10)
        assert error_of(busy, 503)["code"] == "queue_full" and busy.headers["retry-after"] == "1"
        s.proc.send_signal(signal.SIGTERM)
        # the open stream ends properly: finished, or cut by the shutdown with an error event
        events = sse_events(lines)
    assert events[-1] == "[DONE]"
    last = events[-2]
    assert ("error" in last and last["error"]["code"] == "shutting_down") or last["choices"][0]["finish_reason"]
    assert s.proc.wait(20) in GRACEFUL
    log = s.proc.stdout.read()
    assert "Finished server process" in log and "Traceback" not in log


def test_http_bodies_default_to_openais_temperature():
    """OpenAI's API samples at temperature 1 when a body gives none (or null); an explicit 0 stays
    greedy, and the Python API keeps mistral.rs's None (greedy)."""
    from mistral_ref.api_types import ChatCompletionRequest, CompletionRequest
    chat = {"messages": [{"role": "user", "content": "Hi"}]}
    assert ChatCompletionRequest.from_openai(chat).temperature == 1.0
    assert ChatCompletionRequest.from_openai({**chat, "temperature": None}).temperature == 1.0
    assert ChatCompletionRequest.from_openai({**chat, "temperature": 0}).temperature == 0
    assert CompletionRequest.from_openai({"prompt": "Hi"}).temperature == 1.0
    assert CompletionRequest(prompt="Hi").temperature is None


def test_the_engine_survives_a_failing_step(runner, monkeypatch):
    """A bug in a forward pass fails the requests running then (a 500 each), not the engine."""
    import asyncio

    from mistral_ref.server import _DONE, Engine, Job

    real_step, calls = runner.step, []

    def step_failing_once(preempt=None):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a kernel bug")
        real_step(preempt)
    monkeypatch.setattr(runner, "step", step_failing_once)
    engine = Engine(runner)
    engine.start()

    async def run() -> list:
        request = ChatCompletionRequest(messages=CHAT, max_tokens=3, temperature=0)
        job = Job(lambda: runner.submit(request), False, asyncio.get_running_loop())
        engine.submit(job)
        events = [await asyncio.wait_for(job.get(), 60)]  # a dead engine thread: a timeout, not a hang
        while events[-1][0] is not _DONE:
            events.append(await asyncio.wait_for(job.get(), 60))
        return events
    try:
        first, second = asyncio.run(run()), asyncio.run(run())
    finally:
        engine.stop()
    assert first[0][0] == "error" and str(first[0][1]) == "a kernel bug"
    assert second[0][0] == "result"
    expected = reference_chat(runner, max_tokens=3)["choices"][0]["message"]["content"]
    assert second[0][1]["choices"][0]["message"]["content"] == expected
    assert engine.stats()["running"] == 0


def test_the_engine_wakes_the_event_loop_once_a_round(runner):
    """Four streams decoding together: every stream gets its chunks in order (the texts of the
    request alone), and the engine hands the event loop a round's events together, not one
    wake-up per event (each wake-up is a system call and a hand-over of the GIL)."""
    import asyncio

    from mistral_ref.server import _DONE, Engine, Job

    engine = Engine(runner)
    engine.start()
    request = ChatCompletionRequest(messages=CHAT, max_tokens=6, temperature=0, stream=True)

    async def run() -> tuple[list, int]:
        loop, posts = asyncio.get_running_loop(), []
        post = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *args: (posts.append(1), post(*args))[1]
        jobs = [Job(lambda: runner.submit(request), True, loop) for _ in range(4)]
        for job in jobs:
            engine.submit(job)

        async def events(job: Job) -> list:
            out = [await asyncio.wait_for(job.get(), 60)]
            while out[-1][0] is not _DONE:
                out.append(await asyncio.wait_for(job.get(), 60))
            return out
        return await asyncio.gather(*(events(job) for job in jobs)), len(posts)
    try:
        streams, n_posts = asyncio.run(run())
    finally:
        engine.stop()
    expected = reference_chat(runner, max_tokens=6)["choices"][0]["message"]["content"]
    for events in streams:
        assert events[0][0] == "accepted" and events[-1][0] is _DONE
        assert "".join(v["choices"][0]["delta"]["content"] for k, v in events if k == "chunk") == expected
    n_events = sum(len(events) for events in streams)
    assert n_events >= 4 * 8 and n_posts <= n_events // 3


def test_a_request_arriving_during_a_decode_round_preempts_it(runner, monkeypatch):
    """A request that reaches the engine while it decodes (here: submitted from inside the first
    decode round, at its first layer) abandons that round, once; its prompt runs next, and both
    requests stream what each gets alone."""
    import asyncio

    from mistral_ref.server import _DONE, Engine, Job

    engine = Engine(runner)
    preempted = runner.scheduler.n_preempted
    streamed = lambda n: ChatCompletionRequest(messages=CHAT, max_tokens=n, temperature=0, stream=True)

    async def run() -> list:
        loop = asyncio.get_running_loop()
        jobs = [Job(lambda n=n: runner.submit(streamed(n)), True, loop) for n in (8, 4)]
        waiting, late = engine._request_waiting, [jobs[1]]

        def arrives_now() -> bool:
            if late:
                engine.submit(late.pop())
            return waiting()
        monkeypatch.setattr(engine, "_request_waiting", arrives_now)
        engine.start()
        engine.submit(jobs[0])

        async def text(job: Job) -> str:
            events = [await asyncio.wait_for(job.get(), 60)]
            while events[-1][0] is not _DONE:
                events.append(await asyncio.wait_for(job.get(), 60))
            return "".join(v["choices"][0]["delta"]["content"] for k, v in events if k == "chunk")
        return await asyncio.gather(*(text(job) for job in jobs))
    try:
        texts = asyncio.run(run())
    finally:
        engine.stop()
    assert runner.scheduler.n_preempted - preempted == 1
    assert texts == [reference_chat(runner, max_tokens=n)["choices"][0]["message"]["content"] for n in (8, 4)]


def test_in_passing_thread_loads_off_the_calling_thread():
    """serve() loads the model on a thread that ends (see in_passing_thread): the result comes
    back, an exception is raised on the caller, and the work ran on another, finished thread."""
    from mistral_ref.server import in_passing_thread
    seen = []

    def load():
        seen.append(threading.current_thread())
        return 42
    assert in_passing_thread(load) == 42
    assert seen[0] is not threading.current_thread() and not seen[0].is_alive()

    def broken():
        raise FileNotFoundError("no such GGUF file: x.gguf")
    with pytest.raises(FileNotFoundError, match="x.gguf"):
        in_passing_thread(broken)
