"""Request and response objects of the Python API, spelled as mistral.rs's `mistralrs` module.

Plain dataclasses, not pydantic models: the core package does not depend on pydantic (it comes
only with the server extra), and each request validates itself on construction, so bad input fails
the same way from Python and from JSON. The server builds requests from OpenAI JSON with
`ChatCompletionRequest.from_openai(body)` / `CompletionRequest.from_openai(body)` and answers with
`response.to_dict()` (alias `model_dump()`), which is the OpenAI JSON.
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mistral_ref.chat_template import message_dicts
from mistral_ref.errors import ChatTemplateError, InvalidRequestError
from mistral_ref.input_files import InputFile, check_input_files, split_file_parts
from mistral_ref.messages import Message
from mistral_ref.tools import ToolChoice, check_tools, search_tool
from mistral_ref.sampler import GRAMMAR_TYPES


# Bounds that keep one request from exhausting memory or time: every choice (or best_of candidate)
# holds a KV cache of its own; top_logprobs is OpenAI's limit.
MAX_CHOICES = 16
MAX_TOP_LOGPROBS = 20


# -- validation helpers -------------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _check_optional_number(name: str, v: Any, low: float | None = None, high: float | None = None,
                           low_open: bool = False, rule: str = "") -> None:
    if v is None:
        return
    if not _is_number(v):
        raise InvalidRequestError(name, f"must be a finite number, got {v!r}")
    if (low is not None and (v < low or (low_open and v == low))) or (high is not None and v > high):
        raise InvalidRequestError(name, f"must be {rule}, got {v!r}")


def _check_optional_int(name: str, v: Any, low: int, rule: str) -> None:
    if v is None:
        return
    if not _is_int(v):
        raise InvalidRequestError(name, f"must be an integer, got {v!r}")
    if v < low:
        raise InvalidRequestError(name, f"must be {rule}, got {v}")


def _check_bool(name: str, v: Any) -> None:
    if not isinstance(v, bool):
        raise InvalidRequestError(name, f"must be true or false, got {v!r}")


def _check_optional_str_list(name: str, v: Any) -> None:
    if v is not None and not (isinstance(v, list) and all(isinstance(s, str) for s in v)):
        raise InvalidRequestError(name, f"must be a list of strings, got {v!r}")


class _SamplingFields:
    """Checks shared by both requests; each class declares the fields (positional order differs)."""

    _NOT_RUN: tuple[str, ...] = ("adapter",)  # mistral.rs fields refused when set

    def _validate_sampling(self) -> None:
        _check_optional_int("max_tokens", self.max_tokens, 0, ">= 0")
        _check_optional_int("n_choices", self.n_choices, 1, ">= 1")
        if self.n_choices is None:
            raise InvalidRequestError("n_choices", "must be an integer >= 1, got None")
        if self.n_choices > MAX_CHOICES:
            raise InvalidRequestError("n_choices", f"must be at most {MAX_CHOICES} (each choice holds "
                                                   f"its own KV cache), got {self.n_choices}")
        _check_optional_number("temperature", self.temperature, 0.0, rule=">= 0")
        _check_optional_number("top_p", self.top_p, 0.0, 1.0, low_open=True, rule="in (0, 1]")
        _check_optional_number("min_p", self.min_p, 0.0, 1.0, rule="in [0, 1)")
        if self.min_p == 1.0:  # would keep only tokens tied with the best: say so, not sample all
            raise InvalidRequestError("min_p", "must be in [0, 1), got 1.0")
        _check_optional_int("top_k", self.top_k, -1, ">= -1 (-1: all tokens)")
        _check_optional_number("presence_penalty", self.presence_penalty, -2.0, 2.0, rule="in [-2, 2]")
        _check_optional_number("frequency_penalty", self.frequency_penalty, -2.0, 2.0, rule="in [-2, 2]")
        _check_optional_number("repetition_penalty", self.repetition_penalty, 0.0, low_open=True, rule="> 0")
        _check_optional_int("seed", self.seed, 0, ">= 0")
        _check_optional_str_list("stop_seqs", self.stop_seqs)
        if self.stop_token_ids is not None and not (isinstance(self.stop_token_ids, list)
                                                    and all(_is_int(i) for i in self.stop_token_ids)):
            raise InvalidRequestError("stop_token_ids", f"must be a list of token ids, got {self.stop_token_ids!r}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, Mapping):
                raise InvalidRequestError("logit_bias", f"must map token ids to numbers, got {self.logit_bias!r}")
            bias = {}
            for k, v in self.logit_bias.items():
                token = int(k) if isinstance(k, str) and k.lstrip("-").isdigit() else k  # JSON keys are strings
                if not _is_int(token) or not _is_number(v):
                    raise InvalidRequestError("logit_bias", f"must map token ids to numbers, got {k!r}: {v!r}")
                bias[token] = float(v)
            self.logit_bias = bias
        _check_bool("stream", self.stream)
        if (self.grammar is None) != (self.grammar_type is None):
            raise InvalidRequestError("grammar_type" if self.grammar_type is None else "grammar",
                                      "grammar and grammar_type must be given together")
        if self.grammar is not None and not isinstance(self.grammar, str):
            raise InvalidRequestError("grammar", f"must be a string, got {type(self.grammar).__name__}")
        if self.grammar_type is not None and self.grammar_type not in GRAMMAR_TYPES:
            raise InvalidRequestError("grammar_type", f"unknown grammar type {self.grammar_type!r} "
                                                      f"(known: {', '.join(GRAMMAR_TYPES)})")
        _check_optional_number("dry_multiplier", self.dry_multiplier, 0.0, rule=">= 0")
        _check_optional_number("dry_base", self.dry_base, 1.0, rule=">= 1")
        _check_optional_int("dry_allowed_length", self.dry_allowed_length, 0, ">= 0")
        _check_optional_str_list("dry_sequence_breakers", self.dry_sequence_breakers)
        _check_bool("ignore_eos", self.ignore_eos)
        _check_bool("truncate_sequence", self.truncate_sequence)
        for name in self._NOT_RUN:
            if getattr(self, name) not in (None, False):
                raise InvalidRequestError(name, "is not supported by mistral-ref (it runs no code "
                                                "execution, shell, file, session, adapter or "
                                                "dispatch tools)")

    def _validate_logprobs(self, enabled: bool) -> None:
        _check_optional_int("top_logprobs", self.top_logprobs, 0, ">= 0")
        if self.top_logprobs is not None and self.top_logprobs > MAX_TOP_LOGPROBS:
            raise InvalidRequestError("top_logprobs", f"must be at most {MAX_TOP_LOGPROBS} (as "
                                                      f"OpenAI's), got {self.top_logprobs}")
        if self.top_logprobs and not enabled:
            raise InvalidRequestError("top_logprobs", "needs logprobs enabled")


def _stop_from_openai(stop: Any) -> dict[str, list]:
    """OpenAI's `stop` (a string or a list of them; mistral.rs also takes token ids: an int or a
    list of them) as request fields: {"stop_seqs": [...]} or {"stop_token_ids": [...]}."""
    if stop is None:
        return {}
    stops = stop if isinstance(stop, list) else [stop]
    if stops and all(_is_int(s) for s in stops):
        return {"stop_token_ids": stops}
    if all(isinstance(s, str) for s in stops):
        return {"stop_seqs": stops}
    raise InvalidRequestError("stop", f"must be a string, a list of strings, a token id or a list of "
                                      f"token ids, got {stop!r}")


def _compact(schema: Mapping[str, Any]) -> dict[str, Any]:
    """A response_format schema as OpenAI's structured outputs produce it: JSON without
    whitespace between tokens (llguidance's whitespace_flexible off, unless the schema says), so
    a model cannot pad the output with blank lines until max_tokens."""
    return {"x-guidance": {"whitespace_flexible": False}, **schema}


def _grammar_from_openai(body: Mapping[str, Any]) -> dict[str, Any]:
    """The request's grammar fields from an HTTP body: mistral.rs's object form `{"grammar":
    {"type": "regex" | "json_schema" | "lark" | "llguidance", "value": ...}}` (a JSON value is
    sent as its JSON text), or OpenAI's `response_format`: "text" (none), "json_object" (any JSON
    object) or "json_schema" (its `schema`); the string form `grammar` + `grammar_type` passes
    through to the request's own checks."""
    grammar, response_format = body.get("grammar"), body.get("response_format")
    if grammar is not None and response_format not in (None, {"type": "text"}):
        raise InvalidRequestError("response_format", "cannot be combined with grammar")
    if isinstance(grammar, Mapping):
        if set(grammar) != {"type", "value"}:
            raise InvalidRequestError("grammar", f'must be {{"type": ..., "value": ...}} or a string, got {grammar!r}')
        value = grammar["value"]
        return {"grammar": value if isinstance(value, str) else json.dumps(value), "grammar_type": grammar["type"]}
    if response_format is None:
        return {}
    kind = response_format.get("type") if isinstance(response_format, Mapping) else None
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"grammar": json.dumps(_compact({"type": "object"})), "grammar_type": "json_schema"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("schema", {}), Mapping):
            raise InvalidRequestError("response_format", 'json_schema needs {"json_schema": {"name": ..., '
                                                         f'"schema": {{...}}}}}}, got {response_format!r}')
        return {"grammar": json.dumps(_compact(spec.get("schema", {}))), "grammar_type": "json_schema"}
    raise InvalidRequestError("response_format", f"unknown type {kind!r} (known: text, json_object, "
                                                 f"json_schema)" if kind else
                              f'must be {{"type": "text" | "json_object" | "json_schema"}}, got {response_format!r}')


@dataclass
class WebSearchOptions:
    """mistral.rs's web_search_options: with `Runner(enable_search=True, search_callback=...)`
    the model is offered a search tool (mistral_ref.agentic), described by search_description."""

    search_context_size: Any = None
    user_location: Any = None
    search_description: str | None = None
    extract_description: str | None = None


REASONING_EFFORTS = ("off", "low", "medium", "high", "xhigh")


def _reasoning_effort(value: Any, enable_thinking: Any) -> str | None:
    """mistral.rs's reasoning_effort, trimmed and lower-cased ("none" is "off"); contradicting
    enable_thinking is an error."""
    if value is None:
        return None
    effort = value.strip().lower() if isinstance(value, str) else value
    effort = "off" if effort == "none" else effort
    if effort not in REASONING_EFFORTS:
        raise InvalidRequestError("reasoning_effort", f"must be one of off, none, "
                                                      f"{', '.join(REASONING_EFFORTS[1:])}, got {value!r}")
    if enable_thinking is not None and enable_thinking != (effort != "off"):
        raise InvalidRequestError("reasoning_effort", f"{value!r} contradicts enable_thinking={enable_thinking}")
    return effort


# OpenAI's default when an HTTP body has no temperature (or null): sampling, as its clients
# expect. The Python API keeps mistral.rs's None (greedy). Without it the seed's curl chat
# example, which sets neither temperature nor max_tokens, could decode greedily into a loop
# until the context was full.
OPENAI_TEMPERATURE = 1.0


@dataclass
class ChatCompletionRequest(_SamplingFields):
    """A chat request (mistralrs.ChatCompletionRequest). `messages`: Message objects, dicts
    {"role", "content"}, or a str taken as an already templated prompt. Raises
    InvalidRequestError naming the bad field."""

    messages: list[Message | dict[str, str]] | str
    model: str = ""
    logprobs: bool = False
    n_choices: int = 1
    logit_bias: dict[int, float] | None = None
    top_logprobs: int | None = None
    max_tokens: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stream: bool = False
    # mistral.rs's later optional fields
    repetition_penalty: float | None = None
    stop_seqs: list[str] | None = None
    grammar: str | None = None
    grammar_type: str | None = None
    min_p: float | None = None
    seed: int | None = None
    tool_schemas: list[dict[str, Any] | str] | None = None  # OpenAI's `tools`, or their JSON texts
    tool_choice: str | dict[str, Any] | ToolChoice | None = None  # "none", "auto" (default), "required", a function
    dry_multiplier: float | None = None  # DRY repetition penalty (mistral_ref.sampler)
    dry_base: float | None = None
    dry_allowed_length: int | None = None
    dry_sequence_breakers: list[str] | None = None
    web_search_options: WebSearchOptions | None = None  # needs Runner(enable_search=True, search_callback=...)
    enable_thinking: bool | None = None  # passed to the chat template
    truncate_sequence: bool = False  # cut the prompt from the left to fit the context
    reasoning_effort: str | None = None  # passed to the chat template
    max_tool_rounds: int | None = None  # rounds of Runner(tool_callbacks=...) (default 256)
    ignore_eos: bool = False  # do not stop at the model's end-of-generation tokens
    # mistral.rs's agent fields, refused when set (InvalidRequestError)
    tool_dispatch_url: str | None = None
    enable_code_execution: bool = False
    enable_shell: bool = False
    shell_skills: list[Any] | None = None
    agent_permission: Any = None
    agent_approval_callback: Any = None
    code_execution_permission: Any = None
    session_id: str | None = None
    files: list[Any] | None = None
    input_files: list[InputFile] | None = None  # previewed in a system message (mistral_ref.input_files)
    adapter: Any = None

    _NOT_RUN = ("tool_dispatch_url", "enable_code_execution", "enable_shell", "shell_skills",
                "agent_permission", "agent_approval_callback", "code_execution_permission",
                "session_id", "files", "adapter")

    def __post_init__(self) -> None:
        if self.enable_thinking is not None:
            _check_bool("enable_thinking", self.enable_thinking)
        self.reasoning_effort = _reasoning_effort(self.reasoning_effort, self.enable_thinking)
        _check_optional_int("max_tool_rounds", self.max_tool_rounds, 0, ">= 0")
        searching = [search_tool()] if self.web_search_options is not None else []
        tools = check_tools(self.tool_schemas or searching or None, self.tool_choice)
        if tools is not None and tools.forced and self.grammar is not None:
            raise InvalidRequestError("tool_choice", f"{self.tool_choice!r} constrains the output to a "
                                                     f"call: it cannot be combined with a grammar")
        if isinstance(self.messages, str):
            if not self.messages:
                raise InvalidRequestError("messages", "the prompt is empty")
        elif not isinstance(self.messages, list) or not self.messages:
            raise InvalidRequestError("messages", "must be a non-empty list of messages")
        else:
            try:
                message_dicts(self.messages)
            except ChatTemplateError as e:
                raise InvalidRequestError("messages", str(e)) from None
        check_input_files(self.input_files, self.messages)
        _check_bool("logprobs", self.logprobs)
        self._validate_sampling()
        self._validate_logprobs(self.logprobs)

    @classmethod
    def from_openai(cls, body: Mapping[str, Any]) -> ChatCompletionRequest:
        """From an OpenAI /v1/chat/completions JSON body (`n`, `stop`, `max_completion_tokens`;
        user messages' {"type": "file", "file": {"filename", "file_data"}} content parts become
        `input_files`, as in mistral.rs's server); unknown keys are ignored."""
        if not isinstance(body, Mapping):
            raise InvalidRequestError("body", "must be a JSON object")
        if "messages" not in body:
            raise InvalidRequestError("messages", "is required")
        names = {f.name for f in dataclasses.fields(cls)} - {"input_files"}  # only from file parts
        args = {k: v for k, v in body.items() if k in names and k != "stop_seqs" and v is not None}
        if isinstance(args.get("messages"), list):
            args["messages"], files = split_file_parts(args["messages"])
            if files:
                args["input_files"] = files
        args.setdefault("temperature", OPENAI_TEMPERATURE)
        if body.get("n") is not None:
            args["n_choices"] = body["n"]
        if body.get("max_completion_tokens") is not None:  # OpenAI's newer name for max_tokens
            args["max_tokens"] = body["max_completion_tokens"]
        if body.get("tools") is not None:
            args["tool_schemas"] = body["tools"]
        args.update(_stop_from_openai(body.get("stop")))
        args.update(_grammar_from_openai(body))
        return cls(**args)


@dataclass
class CompletionRequest(_SamplingFields):
    """A text completion request (mistralrs.CompletionRequest). Extensions beyond mistral.rs:
    `logprobs` (an int: how many alternatives to report per token, OpenAI's completions meaning;
    None: no logprobs), `stream`, `seed`, `stop_token_ids`. Raises InvalidRequestError."""

    prompt: str | list[int]  # text, or token ids (an extension, as OpenAI's HTTP API takes)
    model: str = ""
    best_of: int = 1
    echo_prompt: bool = False
    logit_bias: dict[int, float] | None = None
    max_tokens: int | None = None
    n_choices: int = 1
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop_seqs: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    suffix: str | None = None
    grammar: str | None = None
    grammar_type: str | None = None
    # mistral.rs's later optional fields, then extensions
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop_token_ids: list[int] | None = None
    logprobs: int | None = None
    stream: bool = False
    dry_multiplier: float | None = None
    dry_base: float | None = None
    dry_allowed_length: int | None = None
    dry_sequence_breakers: list[str] | None = None
    truncate_sequence: bool = False
    ignore_eos: bool = False
    tool_schemas: list[Any] | None = None  # refused: tool calling is a chat feature here
    tool_choice: Any = None
    adapter: Any = None

    _NOT_RUN = ("tool_schemas", "tool_choice", "adapter")

    @property
    def top_logprobs(self) -> int | None:
        return self.logprobs

    def __post_init__(self) -> None:
        token_ids = isinstance(self.prompt, list) and all(_is_int(i) for i in self.prompt)
        if not (isinstance(self.prompt, str) or token_ids) or not self.prompt:
            raise InvalidRequestError("prompt", "must be a non-empty string or list of token ids")
        _check_bool("echo_prompt", self.echo_prompt)
        if self.suffix is not None and not isinstance(self.suffix, str):
            raise InvalidRequestError("suffix", f"must be a string, got {self.suffix!r}")
        self._validate_sampling()
        _check_optional_int("logprobs", self.logprobs, 0, ">= 0")
        _check_optional_int("best_of", self.best_of, 1, ">= 1")
        if self.best_of is not None and self.best_of > MAX_CHOICES:
            raise InvalidRequestError("best_of", f"must be at most {MAX_CHOICES} (each candidate "
                                                 f"holds its own KV cache), got {self.best_of}")
        if self.best_of is None or self.best_of < self.n_choices:
            raise InvalidRequestError("best_of", f"must be >= n_choices ({self.n_choices}), got {self.best_of}")
        if self.stream and self.best_of != self.n_choices:
            raise InvalidRequestError("best_of", "cannot be used with stream (the best are known only at the end)")

    @classmethod
    def from_openai(cls, body: Mapping[str, Any]) -> CompletionRequest:
        """From an OpenAI /v1/completions JSON body (`n`, `stop`, `echo`, `logprobs`,
        `max_completion_tokens`); unknown keys are ignored."""
        if not isinstance(body, Mapping):
            raise InvalidRequestError("body", "must be a JSON object")
        if "prompt" not in body:
            raise InvalidRequestError("prompt", "is required")
        names = {f.name for f in dataclasses.fields(cls)}
        args = {k: v for k, v in body.items() if k in names and k != "stop_seqs" and v is not None}
        renames = {"n": "n_choices", "echo": "echo_prompt",
                   "max_completion_tokens": "max_tokens"}  # OpenAI's newer name for max_tokens
        args.update({renames[k]: v for k, v in body.items() if k in renames and v is not None})
        args.setdefault("temperature", OPENAI_TEMPERATURE)
        if "best_of" not in args and "n_choices" in args:
            args["best_of"] = args["n_choices"]
        args.update(_stop_from_openai(body.get("stop")))
        args.update(_grammar_from_openai(body))
        return cls(**args)


# -- responses ----------------------------------------------------------------------------------
class _Json:
    """Responses turn into OpenAI JSON with `to_dict()` (alias `model_dump()`, pydantic's name)."""

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)

    def model_dump(self) -> dict[str, Any]:
        return self.to_dict()


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _plain(value: Any) -> Any:
    """`dataclasses.asdict` without its deep copy of every leaf, which the responses' leaves (str,
    numbers, None) do not need: a streamed chunk 10 -> 5.5 us, once per token and stream."""
    cls = type(value)
    names = _FIELD_NAMES.get(cls)
    if names is None and dataclasses.is_dataclass(cls):
        names = _FIELD_NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))
    if names is not None:
        return {name: _plain(getattr(value, name)) for name in names}
    if cls is list or cls is tuple:
        return cls(_plain(v) for v in value)
    if cls is dict:
        return {k: _plain(v) for k, v in value.items()}
    return value


def completion_requests(body: Mapping[str, Any]) -> list[CompletionRequest]:
    """OpenAI's /v1/completions `prompt`, which may be a string, a list of token ids, or a list of
    either: one CompletionRequest per prompt (raises InvalidRequestError)."""
    prompt = body.get("prompt") if isinstance(body, Mapping) else None
    several = isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt)
    if several and len(prompt) > MAX_CHOICES:
        raise InvalidRequestError("prompt", f"at most {MAX_CHOICES} prompts in one request, got {len(prompt)}")
    return [CompletionRequest.from_openai({**body, "prompt": p}) for p in prompt] if several else [
        CompletionRequest.from_openai(body)]


@dataclass
class Usage(_Json):
    completion_tokens: int
    prompt_tokens: int
    total_tokens: int
    avg_tok_per_sec: float
    avg_prompt_tok_per_sec: float
    avg_compl_tok_per_sec: float
    total_time_sec: float
    total_prompt_time_sec: float
    total_completion_time_sec: float


def sum_usage(usages: list[Usage | None], sequential: bool = False) -> Usage:
    """The usage of several generations: counts add up; times add up when they ran one after
    another (`sequential`: the rounds of a tool-calling request), else they overlap (prompts
    generated side by side) and the longest counts."""
    combine = sum if sequential else (lambda values: max(values, default=0.0))
    counts = {name: sum(getattr(u, name) for u in usages if u is not None)
              for name in ("completion_tokens", "prompt_tokens", "total_tokens")}
    times = {name: combine([getattr(u, name) for u in usages if u is not None])
             for name in ("total_time_sec", "total_prompt_time_sec", "total_completion_time_sec")}
    rate = lambda n, t: n / t if t else 0.0  # noqa: E731
    return Usage(**counts, **times, avg_tok_per_sec=rate(counts["total_tokens"], times["total_time_sec"]),
                 avg_prompt_tok_per_sec=rate(counts["prompt_tokens"], times["total_prompt_time_sec"]),
                 avg_compl_tok_per_sec=rate(counts["completion_tokens"], times["total_completion_time_sec"]))


@dataclass
class TopLogprob(_Json):
    token: int  # token id (mistral.rs's shape)
    logprob: float
    bytes: str  # the token's text


@dataclass
class ResponseLogprob(_Json):
    token: str  # the token's text
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


@dataclass
class Logprobs(_Json):
    content: list[ResponseLogprob] | None


@dataclass
class ResponseMessage(_Json):
    content: str | None  # None: the reply is only tool calls
    role: str = "assistant"
    tool_calls: list[dict[str, Any]] | None = None  # OpenAI's {id, type, function: {name, arguments}}


@dataclass
class Choice(_Json):
    finish_reason: str
    index: int
    message: ResponseMessage
    logprobs: Logprobs | None = None


@dataclass
class ChatCompletionResponse(_Json):
    id: str
    choices: list[Choice]
    created: int
    model: str
    system_fingerprint: str
    object: str
    usage: Usage


@dataclass
class Delta(_Json):
    content: str | None
    role: str = "assistant"
    tool_calls: list[dict[str, Any]] | None = None  # as ResponseMessage's, each with its `index`


@dataclass
class ChunkChoice(_Json):
    finish_reason: str | None
    index: int
    delta: Delta
    logprobs: Logprobs | None = None


@dataclass
class ChatCompletionChunkResponse(_Json):
    id: str
    choices: list[ChunkChoice]
    created: int
    model: str
    system_fingerprint: str
    object: str
    usage: Usage | None = None


@dataclass
class CompletionChoice(_Json):
    finish_reason: str | None  # None on a streamed chunk before the last
    index: int
    text: str
    logprobs: Logprobs | None = None


@dataclass
class CompletionResponse(_Json):
    id: str
    choices: list[CompletionChoice]
    created: int
    model: str
    system_fingerprint: str
    object: str
    usage: Usage | None = None


__all__ = [
    "ChatCompletionChunkResponse", "ChatCompletionRequest", "ChatCompletionResponse", "Choice",
    "ChunkChoice", "CompletionChoice", "CompletionRequest", "CompletionResponse", "Delta",
    "Logprobs", "ResponseLogprob", "ResponseMessage", "TopLogprob", "ToolChoice", "Usage",
    "WebSearchOptions",
]
