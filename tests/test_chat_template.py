"""Chat templates: the Mistral instruct fallback vs mistral-common's token ids, GGUF templates,
overrides, and clear errors for bad templates and bad conversations."""
from __future__ import annotations

import copy

import pytest

from mistral_ref.chat_template import (MISTRAL_INSTRUCT_TEMPLATE, apply_chat_template,
                                       load_chat_template, render_chat_template)
from mistral_ref.errors import ChatTemplateError, MistralRefError
from mistral_ref.messages import Message, Role
from mistral_ref.models import default_model_path, mistral_v1_tokenizer_path
from mistral_ref.tokenizer import Tokenizer, sentencepiece_gguf_metadata

CONVERSATIONS = [
    [("system", "Be brief."), ("user", "Hi there"), ("assistant", "Hello!"), ("user", "How are you?")],
    [("user", "Hi")],
    [("user", "a\n b  c 😀"), ("assistant", "  spaced\n"), ("user", "你好，世界")],
    [("system", "S"), ("user", "U1"), ("assistant", "A1"), ("user", "U2"), ("assistant", "A2"),
     ("user", "def f():\n    return [1, 2]")],
]


@pytest.fixture(scope="module")
def mistral_tok() -> Tokenizer:
    """Mistral v1 vocabulary, GGUF metadata without a chat template: the fallback applies."""
    return Tokenizer.from_metadata(sentencepiece_gguf_metadata(mistral_v1_tokenizer_path(progress=False)))


@pytest.fixture(scope="module")
def mistral_common_tok():
    pytest.importorskip("mistral_common")
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    return MistralTokenizer.from_file(str(mistral_v1_tokenizer_path(progress=False)))


@pytest.fixture(scope="module")
def smol_tok() -> Tokenizer:
    return Tokenizer.from_gguf(default_model_path(progress=False))


def _mistral_common_ids(tokenizer, conversation: list[tuple[str, str]]) -> list[int]:
    from mistral_common.protocol.instruct.messages import (AssistantMessage, SystemMessage,
                                                           UserMessage)
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    request = ChatCompletionRequest(messages=[kinds[r](content=c) for r, c in conversation])
    return tokenizer.encode_chat_completion(request).tokens


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_mistral_fallback_matches_mistral_common(mistral_tok, mistral_common_tok, conversation):
    assert mistral_tok.chat_template is None
    expected = _mistral_common_ids(mistral_common_tok, conversation)
    as_messages = [Message(Role(r), c) for r, c in conversation]
    as_dicts = [{"role": r, "content": c} for r, c in conversation]
    assert apply_chat_template(mistral_tok, as_messages) == expected
    assert apply_chat_template(mistral_tok, as_dicts) == expected
    # The same template stored as a GGUF's tokenizer.chat_template gives the same ids.
    assert apply_chat_template(mistral_tok, as_dicts, chat_template=MISTRAL_INSTRUCT_TEMPLATE) == expected


@pytest.mark.parametrize("roles", [("user", "user"), ("assistant",), ("user", "assistant", "assistant"),
                                   ("system", "assistant"), ("user", "system")])
def test_roles_must_alternate(mistral_tok, roles):
    with pytest.raises(ChatTemplateError, match="rejected the messages"):
        apply_chat_template(mistral_tok, [{"role": r, "content": "x"} for r in roles])


def test_gguf_chatml_template(smol_tok):
    messages = [Message(Role.System, "sys"), Message(Role.User, "hi")]
    # ChatML, as SmolLM2's template defines it.
    expected = "<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert render_chat_template(smol_tok.chat_template, messages) == expected
    ids = apply_chat_template(smol_tok, messages)
    start, end = smol_tok.tokens.index("<|im_start|>"), smol_tok.tokens.index("<|im_end|>")
    assert ids.count(start) == 3 and ids.count(end) == 2
    assert smol_tok.decode(ids) == expected
    assert render_chat_template(smol_tok.chat_template, messages, add_generation_prompt=False) \
        == expected.removesuffix("<|im_start|>assistant\n")


def test_chat_template_override(smol_tok, tmp_path):
    literal = "{% for m in messages %}{{ m.role }}={{ m.content }};{% endfor %}"
    assert load_chat_template(literal, smol_tok) == literal
    path = tmp_path / "template.jinja"
    path.write_text(literal)
    assert load_chat_template(path, smol_tok) == literal
    ids = apply_chat_template(smol_tok, [Message(Role.User, "hi")], chat_template=str(path))
    assert smol_tok.decode(ids) == "user=hi;"
    assert load_chat_template(None, smol_tok) == smol_tok.chat_template
    with pytest.raises(ChatTemplateError, match="neither a Jinja template nor a readable file"):
        load_chat_template(tmp_path / "missing.jinja", smol_tok)


def test_template_variables():
    source = ("{{ bos_token }}|{{ eos_token }}|{{ add_generation_prompt }}|{{ messages | tojson }}|"
              "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.role }}{% endfor %}")
    out = render_chat_template(source, [{"role": "user", "content": "é"}, Message(Role.Assistant, "b")],
                               bos_token="<s>", eos_token="</s>")
    assert out == ('<s>|</s>|True|[{"role": "user", "content": "é"}, '
                   '{"role": "assistant", "content": "b"}]|user')


@pytest.mark.parametrize("source, match", [
    ("{{ raise_exception('nope') }}", "nope"),
    ("{% for m in messages %}", "syntax error"),
    ("{{ messages[5]['content'] + 1 }}", "rendering the chat template failed"),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "rendering the chat template failed"),
    ("{% set _ = messages.append(1) %}", "rendering the chat template failed"),
])
def test_bad_templates(source, match):
    with pytest.raises(ChatTemplateError, match=match):
        render_chat_template(source, [{"role": "user", "content": "x"}])


def test_bad_messages(mistral_tok):
    with pytest.raises(ChatTemplateError, match="unknown message role 'robot'"):
        apply_chat_template(mistral_tok, [{"role": "robot", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="'role' and 'content'"):
        apply_chat_template(mistral_tok, [{"content": "x"}])
    with pytest.raises(ChatTemplateError, match="must be a str"):
        Message(Role.User, 3)  # type: ignore[arg-type]
    assert issubclass(ChatTemplateError, MistralRefError) and issubclass(ChatTemplateError, ValueError)


def test_no_template_for_byte_level_model(smol_tok):
    tok = copy.copy(smol_tok)
    tok.chat_template = None
    with pytest.raises(ChatTemplateError, match="no tokenizer.chat_template"):
        apply_chat_template(tok, [Message(Role.User, "hi")])
