"""mistral.rs's current Python API (mistralrs 0.9.x) beyond the seed: Runner's arguments,
Architecture, the request fields DRY, ignore_eos, truncate_sequence, enable_thinking /
reasoning_effort, tool_schemas as JSON strings with ToolChoice, tool callbacks and the search
callback, max_seqs, list_models. Checked on a tiny random Mistral model against independent
restatements of mistral.rs's rules."""
from __future__ import annotations

import ast
import importlib.util
import inspect
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mistral_ref import (Architecture, ChatCompletionRequest, CompletionRequest, ModelDType,
                         PagedCacheType, Runner, TextAutoMapParams, ToolChoice, WebSearchOptions,
                         Which)
from mistral_ref.agentic import ToolRounds
from mistral_ref.api_types import ChatCompletionResponse, Choice, ResponseMessage, Usage
from mistral_ref.errors import InvalidRequestError
from mistral_ref.sampler import SamplingParams, dry_penalties
from mistral_ref.synth import synth_model

ASK = [{"role": "user", "content": "Weather in Oslo?"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}},
                                          "required": ["city"], "additionalProperties": False}}}
# mistralrs 0.9.5's Runner.__init__ parameters, in order (its mistralrs.pyi)
MISTRALRS_RUNNER = ["which", "max_seqs", "no_kv_cache", "prefix_cache_n", "token_source", "mtp_model",
                    "mtp_n_predict", "chat_template", "jinja_explicit", "num_device_layers", "in_situ_quant",
                    "anymoe_config", "memory_goal", "pa_blk_size", "pa_cache_type", "no_paged_attn",
                    "paged_attn", "seed", "enable_search", "search_embedding_model", "search_callback",
                    "tool_callbacks", "mcp_client_config", "code_execution_config", "shell_config"]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("api") / "tiny.gguf"
    synth_model(path, "tiny", "Q4_K_M", sliding_window=16, seed=0, progress=False)
    return path


@pytest.fixture(scope="module")
def tiny(tiny_path) -> Runner:
    return Runner(Which.GGUF(str(tiny_path)))


# -- Runner -------------------------------------------------------------------------------------
def _mistralrs_pyi_runner() -> list[str] | None:
    spec = importlib.util.find_spec("mistralrs")
    if spec is None or not spec.submodule_search_locations:
        return None
    pyi = Path(next(iter(spec.submodule_search_locations))) / "__init__.pyi"
    tree = ast.parse(pyi.read_text())
    runner = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Runner")
    init = next(n for n in runner.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    return [a.arg for a in init.args.args[1:]]


def test_runner_takes_mistralrs_arguments_in_its_order():
    ours = [p.name for p in inspect.signature(Runner).parameters.values()
            if p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert ours == MISTRALRS_RUNNER
    installed = _mistralrs_pyi_runner()
    if installed is not None:  # the wheel's own stub, when the oracle extra is installed
        assert ours == installed


def test_architecture_has_mistral_rs_members():
    assert Architecture.Mistral.value == "mistral" and Architecture.Llama.value == "llama"
    assert {"Qwen3", "Gemma2", "Phi3", "Mixtral", "DeepseekV3", "SmolLm3", "GptOss"} <= set(Architecture.__members__)
    spec = importlib.util.find_spec("mistralrs")
    if spec is not None and spec.submodule_search_locations:
        tree = ast.parse((Path(next(iter(spec.submodule_search_locations))) / "__init__.pyi").read_text())
        arch = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Architecture")
        theirs = {t.targets[0].id: t.value.value for t in arch.body if isinstance(t, ast.Assign)}
        assert {m.name: m.value for m in Architecture} == theirs


@pytest.mark.parametrize("kwargs, field", [
    (dict(no_kv_cache=True), "no_kv_cache"), (dict(mtp_model="x"), "mtp_model"),
    (dict(anymoe_config=object()), "anymoe_config"), (dict(paged_attn=True), "paged_attn"),
    (dict(paged_attn=True, no_paged_attn=True), "paged_attn"),
    (dict(pa_cache_type=PagedCacheType.F8E4M3), "pa_cache_type"), (dict(enable_search=True), "enable_search"),
    (dict(token_source="hf-token"), "token_source"), (dict(max_seqs=0), "max_seqs"),
    (dict(num_device_layers=["1:10"]), "num_device_layers"), (dict(num_device_layers=["ten"]), "num_device_layers"),
    (dict(tool_callbacks={"f": "not callable"}), "tool_callbacks"), (dict(shell_config=object()), "shell_config"),
    (dict(in_situ_quant="HQQ4"), None),
])
def test_runner_refuses_what_it_cannot_honour(tiny_path, kwargs, field):
    with pytest.raises(ValueError, match=field or "HQQ4"):
        Runner(Which.GGUF(str(tiny_path)), **kwargs)


def test_runner_accepts_settings_with_a_meaning_here(tiny_path):
    runner = Runner(Which.GGUF(str(tiny_path), dtype=ModelDType.Auto), 4, False, 0, "literal:hf_xyz",
                    num_device_layers=["500"], memory_goal=0.9, pa_blk_size=32,
                    pa_cache_type=PagedCacheType.Auto, no_paged_attn=True, pa_gpu_mem=4096,
                    jinja_explicit="{{ messages[0]['content'] }}")
    assert runner.max_seqs == 4 and runner.prefix_cache is None
    assert runner.submit(ChatCompletionRequest(ASK, max_tokens=1)).job.prompt_ids[1:] == runner.tokenize_text(
        ASK[0]["content"], False)  # jinja_explicit is the template
    assert runner.list_models() == ["tiny.gguf"] == [runner.get_default_model_id()]
    assert runner.is_model_loaded("tiny.gguf") and not runner.is_model_loaded("other")
    with pytest.raises(InvalidRequestError, match="model_id"):
        runner.send_chat_completion_request(ChatCompletionRequest(ASK, max_tokens=1), model_id="other")
    assert Which.Plain("x", auto_map_params=TextAutoMapParams(max_seq_len=4096, max_batch_size=2)).model_id == "x"


def test_max_seqs_admits_generations_in_order(tiny_path):
    runner = Runner(Which.GGUF(str(tiny_path)), max_seqs=1)
    first, second = (runner.submit(ChatCompletionRequest(ASK, max_tokens=3)) for _ in range(2))
    first.start(), second.start()
    while not first.done:
        runner.step()
        assert not second.generation.events and second.generation.cache.length == 0
    while not second.done:
        runner.step()
    alone = Runner(Which.GGUF(str(tiny_path))).send_chat_completion_request(ChatCompletionRequest(ASK, max_tokens=3))
    assert second.response().choices[0].message.content == alone.choices[0].message.content


# -- requests -----------------------------------------------------------------------------------
def test_ignore_eos(tiny):
    eos = tiny.tokenizer.eos_id
    stop = tiny.send_chat_completion_request(ChatCompletionRequest(ASK, max_tokens=5, logit_bias={eos: 100.0}))
    assert stop.choices[0].finish_reason == "stop" and stop.usage.completion_tokens == 1
    on = tiny.send_chat_completion_request(ChatCompletionRequest(ASK, max_tokens=5, logit_bias={eos: 100.0},
                                                                 ignore_eos=True))
    assert on.choices[0].finish_reason == "length" and on.usage.completion_tokens == 5


def test_truncate_sequence_keeps_the_end_of_the_prompt(tiny):
    context = tiny.max_sequence_length()
    ids = list(np.random.default_rng(0).integers(3, 32000, context + 40))
    with pytest.raises(InvalidRequestError, match="context"):
        tiny.send_completion_request(CompletionRequest([int(i) for i in ids], max_tokens=4))
    cut = tiny.send_completion_request(CompletionRequest([int(i) for i in ids], max_tokens=4, truncate_sequence=True))
    kept = [int(i) for i in ids[-(context - 4):]]
    assert cut.usage.prompt_tokens == context - 4
    assert cut.choices[0].text == tiny.send_completion_request(CompletionRequest(kept, max_tokens=4)).choices[0].text


def test_thinking_fields_reach_the_chat_template(tiny_path):
    template = ("{% if enable_thinking is defined %}think={{ enable_thinking }} effort={{ reasoning_effort }}"
                "{% else %}plain{% endif %}")
    runner = Runner(Which.GGUF(str(tiny_path)), chat_template=template)
    prompt = lambda **kw: runner.detokenize_text(  # noqa: E731
        runner.submit(ChatCompletionRequest(ASK, max_tokens=1, **kw)).job.prompt_ids, True)
    assert prompt() == "plain"
    assert prompt(enable_thinking=True, reasoning_effort=" HIGH ") == "think=True effort=high"
    with pytest.raises(InvalidRequestError, match="reasoning_effort"):
        ChatCompletionRequest(ASK, enable_thinking=False, reasoning_effort="high")
    with pytest.raises(InvalidRequestError, match="reasoning_effort"):
        ChatCompletionRequest(ASK, reasoning_effort="max")
    assert ChatCompletionRequest(ASK, reasoning_effort="none").reasoning_effort == "off"


def test_tool_schemas_as_json_strings_and_tool_choice_enum(tiny):
    request = ChatCompletionRequest(ASK, max_tokens=8, tool_schemas=[json.dumps(WEATHER)], tool_choice=ToolChoice.Auto)
    assert tiny.submit(request).job.prompt_ids == tiny.submit(
        ChatCompletionRequest(ASK, max_tokens=8, tool_schemas=[WEATHER], tool_choice="auto")).job.prompt_ids
    assert ChatCompletionRequest(ASK, tool_schemas=[json.dumps(WEATHER)], tool_choice=ToolChoice.NoTools)
    with pytest.raises(InvalidRequestError, match="tool_schemas"):
        ChatCompletionRequest(ASK, tool_schemas=["{not json"])


@pytest.mark.parametrize("field", ["enable_shell", "enable_code_execution", "tool_dispatch_url", "files"])
def test_agent_fields_this_engine_does_not_run_are_refused(field):
    with pytest.raises(InvalidRequestError, match=field):
        ChatCompletionRequest(ASK, **{field: True if field.startswith("enable") else ["x"]})


def test_http_bodies_carry_the_new_fields():
    body = {"messages": ASK, "dry_multiplier": 0.8, "dry_allowed_length": 3, "ignore_eos": True,
            "truncate_sequence": True, "enable_thinking": False}
    request = ChatCompletionRequest.from_openai(body)
    assert (request.dry_multiplier, request.dry_allowed_length, request.ignore_eos, request.truncate_sequence,
            request.enable_thinking) == (0.8, 3, True, True, False)


# -- DRY ----------------------------------------------------------------------------------------
def dry_reference(context, multiplier, base, allowed, breakers):
    """DRY as mistral.rs's sampler.rs computes it, restated per candidate position: token
    context[p] is proposed when context[p - 1] is the last token (p - 1 before the end); its match
    is how far the tokens before p agree with the context's ending, the first pair always, later
    ones only while the ending's token is no breaker, within the start and 50 tokens."""
    n, longest = len(context), {}
    for p in range(1, n - 1 + 1):
        if p - 1 == n - 1 or context[p - 1] != context[-1] or context[p] in breakers:
            continue
        m = 0
        while m < 50 and m < p and context[p - 1 - m] == context[n - 1 - m] and (m == 0 or context[n - 1 - m] not in breakers):
            m += 1
        longest[context[p]] = max(longest.get(context[p], 0), m)
    return {t: multiplier * base ** (m - allowed) for t, m in longest.items() if m >= allowed}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=0, max_size=90), st.floats(0.1, 3), st.floats(1.0, 2.0),
       st.integers(0, 4), st.sets(st.integers(0, 4), max_size=2))
def test_dry_penalties_equal_the_restated_rule(context, multiplier, base, allowed, breakers):
    params = SamplingParams(dry_multiplier=multiplier, dry_base=base, dry_allowed_length=allowed,
                            dry_breakers=frozenset(breakers))
    got, want = dry_penalties(context, params), dry_reference(context, multiplier, base, allowed, breakers)
    assert got.keys() == want.keys()
    for token in want:
        assert got[token] == pytest.approx(want[token], rel=1e-12)


def test_dry_keeps_greedy_decoding_off_repeats(tiny):
    request = ChatCompletionRequest([{"role": "user", "content": "a b a b a b a b"}], max_tokens=24,
                                    dry_multiplier=1e3, dry_allowed_length=2)
    submission = tiny.submit(request)
    prompt, breakers = submission.job.prompt_ids, submission.job.params.dry_breakers
    assert breakers == {tiny.tokenize_text("a" + b, False)[-1] for b in ("\n", ":", '"', "*")}
    out = tiny.send_chat_completion_request(request)
    generated = tiny.tokenize_text(out.choices[0].message.content, False)
    context = list(prompt)
    for token in generated[:8]:  # re-tokenizing the text is exact for a few tokens at least
        assert token not in dry_reference(context, 1e3, 1.75, 2, breakers)
        context.append(token)


# -- tool callbacks -----------------------------------------------------------------------------
def _response(message: ResponseMessage, tokens: int) -> ChatCompletionResponse:
    usage = Usage(tokens, 10, tokens + 10, 0.0, 0.0, 0.0, 1.0, 0.5, 0.5)
    return ChatCompletionResponse("id", [Choice("stop", 0, message)], 0, "m", "fp", "chat.completion", usage)


def test_tool_rounds_run_the_callback_and_feed_back_its_result():
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    replies = iter([_response(ResponseMessage(None, tool_calls=[call]), 5), _response(ResponseMessage("Sunny."), 3)])
    sent, called = [], []

    def send(request):
        sent.append(request)
        return next(replies)

    def weather(name, arguments):
        called.append((name, arguments))
        return "Sunny, 22C"
    out = ToolRounds(send, {"get_weather": weather}, ChatCompletionRequest(ASK, tool_schemas=[WEATHER]), []).response()
    assert called == [("get_weather", {"city": "Oslo"})]
    assert out.choices[0].message.content == "Sunny."
    assert sent[1].messages[-2:] == [{"role": "assistant", "content": None, "tool_calls": [call]},
                                     {"role": "tool", "tool_call_id": "call_1", "name": "get_weather",
                                      "content": "Sunny, 22C"}]
    assert (out.usage.completion_tokens, out.usage.prompt_tokens, out.usage.total_time_sec) == (8, 20, 2.0)


@pytest.mark.parametrize("stream", [False, True])
def test_runner_answers_calls_it_has_callbacks_for(tiny_path, stream):
    calls = []
    runner = Runner(Which.GGUF(str(tiny_path)),
                    tool_callbacks={"get_weather": lambda name, args: calls.append(args) or "Sunny"})
    request = ChatCompletionRequest(ASK, max_tokens=40, tool_schemas=[json.dumps(WEATHER)], tool_choice="required",
                                    max_tool_rounds=2, stream=stream)
    out = runner.send_chat_completion_request(request)
    if stream:
        chunks = list(out)
        final_calls = [c for chunk in chunks for c in (chunk.choices[0].delta.tool_calls or [])]
    else:
        final_calls = out.choices[0].message.tool_calls
    assert len(calls) == 2 and all(args["city"] in ("Paris", "Oslo") for args in calls)
    assert final_calls and final_calls[0]["function"]["name"] == "get_weather"  # the round limit returns it


def test_search_callback_answers_the_search_tool(tiny_path):
    queries = []
    runner = Runner(Which.GGUF(str(tiny_path)), enable_search=True,
                    search_callback=lambda q: queries.append(q) or [{"title": "t", "description": "d",
                                                                     "url": "u", "content": "c"}])
    quote = runner.tokenize_text('a"', False)[-1]  # favoured, so that the random model ends its query
    request = ChatCompletionRequest(ASK, max_tokens=60, web_search_options=WebSearchOptions(search_description="Local"),
                                    tool_choice="required", max_tool_rounds=1, logit_bias={quote: 30.0})
    prompt = runner.detokenize_text(runner.submit(ChatCompletionRequest(
        ASK, max_tokens=1, tool_schemas=[{"type": "function", "function": {"name": "search_the_web",
                                                                        "description": "Local"}}])).job.prompt_ids, False)
    assert "search_the_web" in prompt
    runner.send_chat_completion_request(request)
    assert len(queries) == 1
    with pytest.raises(InvalidRequestError, match="web_search_options"):
        Runner(Which.GGUF(str(tiny_path))).send_chat_completion_request(
            ChatCompletionRequest(ASK, web_search_options=WebSearchOptions()))
