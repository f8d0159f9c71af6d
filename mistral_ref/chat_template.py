"""Chat templates: render `tokenizer.chat_template` (a Jinja template, as in HF tokenizer_config)
in a sandbox, or the Mistral instruct format when a llama/mistral GGUF has none.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mistral_ref.errors import ChatTemplateError
from mistral_ref.messages import Message
from mistral_ref.tokenizer import Tokenizer

# Mistral v1 instruct format (Mistral-7B-Instruct-v0.1): "<s>[INST] {system}\n\n{user} [/INST]
# {assistant}</s>[INST] {user} [/INST]". An optional system message is prepended to the first user
# turn, as mistral-common's InstructTokenizerV1 does. No spaces around <s>/</s>: the tokenizer puts
# the SentencePiece prefix space after each special token (llama.cpp's rule), which reproduces
# mistral-common's ids, where every turn is encoded on its own with a dummy prefix.
MISTRAL_INSTRUCT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}"
    "{{- '[INST] ' + message['content'] + ' [/INST]' }}"
    "{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- ' ' + message['content'] + eos_token }}"
    "{%- else %}"
    "{{- raise_exception('Only user and assistant roles are supported, after an optional "
    "first system message') }}"
    "{%- endif %}"
    "{%- endfor %}"
)


def load_chat_template(override: str | os.PathLike | None, tokenizer: Tokenizer) -> str:
    """The Jinja source to render prompts with.

    override: the Runner's `chat_template`, a file path or a literal template; else the GGUF's
      `tokenizer.chat_template`; else, for a SentencePiece (llama/mistral) vocabulary, the Mistral
      instruct format. Raises ChatTemplateError when none applies or the path cannot be read.
    """
    if override is not None:
        text = str(override)
        if "{{" in text or "{%" in text:  # a template, not a file name
            return text
        try:
            return Path(text).read_text(encoding="utf-8")
        except OSError as e:
            raise ChatTemplateError(f"chat_template {text!r} is neither a Jinja template nor a "
                                    f"readable file ({e.strerror})") from None
    if tokenizer.chat_template:
        return tokenizer.chat_template
    if tokenizer.kind == "llama":
        return MISTRAL_INSTRUCT_TEMPLATE
    raise ChatTemplateError("the model has no tokenizer.chat_template and no chat_template was given")


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"chat template rejected the messages: {message}")


def _tojson(value: Any, indent: int | None = None) -> str:
    # HF's tojson keeps non-ASCII characters as they are (Jinja's built-in escapes them).
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    # The same environment HF transformers renders chat templates in: sandboxed (templates come
    # with downloaded files), blocks trimmed, loop controls on.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template has a syntax error at line {e.lineno}: {e.message}") from None


def message_dicts(messages: Sequence[Message | Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages as the dicts templates index (`message['role']`), from `Message` objects or dicts.

    A dict's content may be OpenAI's list of parts: its {"type": "text", "text": ...} parts are
    joined with newlines (as vLLM does); an assistant turn that carries `tool_calls` may have
    content None or none at all (its text is then ""). Raises ChatTemplateError for an unknown role, a missing
    role or content, a part that is not text, or content of another type.
    """
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, Message):
            out.append(m.to_dict())
            continue
        if not isinstance(m, Mapping) or "role" not in m or ("content" not in m and not m.get("tool_calls")):
            raise ChatTemplateError(f"message #{i} must be a Message or a dict with 'role' and "
                                    f"'content', got {m!r}")
        content = m.get("content")
        if content is None and m.get("tool_calls"):
            content = ""
        elif isinstance(content, list):
            content = "\n".join(_text_part(part, i) for part in content)
        out.append({**m, **Message(m["role"], content).to_dict()})
    return out


def _text_part(part: Any, message: int) -> str:
    """The text of one OpenAI content part; the models served here read text only."""
    kind = part.get("type") if isinstance(part, Mapping) else None
    if kind != "text" or not isinstance(part.get("text"), str):
        raise ChatTemplateError(f"message #{message}: content part {kind or part!r} is not supported "
                                f"(only {{'type': 'text', 'text': ...}} parts: the model reads text)")
    return part["text"]


def render_chat_template(source: str, messages: Sequence[Message | Mapping[str, Any]],
                         add_generation_prompt: bool = True, bos_token: str = "",
                         eos_token: str = "", **variables: Any) -> str:
    """Render a chat template to the prompt text.

    The template sees the variables HF templates use: messages (list of dicts), add_generation_prompt,
    bos_token, eos_token, raise_exception, strftime_now, plus any `variables` (e.g. tools).
    Raises ChatTemplateError for a syntax error, a template that raises (e.g. roles that do not
    alternate), or any other failure while rendering.
    """
    template = _compile(source)
    try:
        return template.render(messages=message_dicts(messages),
                               add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token, eos_token=eos_token, **variables)
    except ChatTemplateError:
        raise
    except Exception as e:  # jinja2 errors, and any error the template's own code triggers
        raise ChatTemplateError(f"rendering the chat template failed: {type(e).__name__}: {e}") from None


def apply_chat_template(tokenizer: Tokenizer, messages: Sequence[Message | Mapping[str, Any]],
                        chat_template: str | os.PathLike | None = None,
                        add_generation_prompt: bool = True, **variables: Any) -> list[int]:
    """Prompt token ids for a conversation: the template rendered, then tokenized with special
    tokens parsed; BOS is prepended when the model wants one and the template did not write it."""
    source = load_chat_template(chat_template, tokenizer)

    def text_of(token_id: int | None) -> str:
        return "" if token_id is None else tokenizer.tokens[token_id]

    prompt = render_chat_template(source, messages, add_generation_prompt,
                                  bos_token=text_of(tokenizer.bos_id),
                                  eos_token=text_of(tokenizer.eos_id), **variables)
    ids = tokenizer.encode(prompt, add_special_tokens=False, parse_special=True)
    if tokenizer.add_bos and tokenizer.bos_id is not None and ids[:1] != [tokenizer.bos_id]:
        ids.insert(0, tokenizer.bos_id)
    return ids
