"""Tokenizer from GGUF metadata vs independent oracles: sentencepiece (Mistral v1 `.model`),
the mistralrs wheel (SmolLM2 GGUF, optional), and decode/stream invariants."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mistral_ref.errors import MistralRefError, TokenizerError
from mistral_ref.models import default_model_path, mistral_v1_tokenizer_path
from mistral_ref.tokenizer import (TOKEN_BYTE, TOKEN_CONTROL, TOKEN_NORMAL, TOKEN_UNKNOWN,
                                   IncrementalDetokenizer, Tokenizer, sentencepiece_gguf_metadata)

CORPUS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "trailing space ",
    "  two  spaces,   three,    four",
    "\n",
    " ",
    "line one\nline two\n\n\nafter three newlines\r\nwindows\ttab\t\ttabs",
    "naïve café, Œuvre, straße, ÅNGSTRÖM, ñandú",
    "emoji 😀🎉👍🏽 and a family 👨\u200d👩\u200d👧 and a flag 🏳️\u200d🌈",
    "CJK: 你好，世界！日本語のテキスト。한국어 문장입니다.",
    "Arabic مرحبا بالعالم, Hebrew שלום, Hindi नमस्ते, Thai สวัสดี",
    "math: ∑_{i=1}^{n} x_i² ≤ ∞, ∀ε>0 ∃δ",
    "zero\u200bwidth and combining e\u0301 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and ﷽",
    "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < 10; ++i) { printf(\"%d\\n\", i); }  // C",
    "<html><body class=\"x\">&amp; &lt;tag&gt;</body></html>",
    "numbers 0 1 12 123 1234 12345 3.14159 -42 1e-9 0xFF 1,000,000",
    "I'm sure you'll see they've done it; we'd we're I'LL DON'T",
    "<s>[INST] What is this? [/INST] An answer.</s>",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "[INST]<<SYS>>\nsystem\n<</SYS>>\n\nquestion [/INST]",
    "URLs https://example.com/a?b=c&d=e#f and emails a.b@c.org",
    "    indented code block\n\n\n\n    more",
    "!!!???...,,,;;;:::---___***",
    "a" * 300,
    " " * 17 + "x" + "\n" * 9,
]


@pytest.fixture(scope="module")
def spm_model() -> str:
    return str(mistral_v1_tokenizer_path(progress=False))


@pytest.fixture(scope="module")
def sp(spm_model):
    sentencepiece = pytest.importorskip("sentencepiece")
    return sentencepiece.SentencePieceProcessor(model_file=spm_model)


@pytest.fixture(scope="module")
def spm_tok(spm_model) -> Tokenizer:
    return Tokenizer.from_metadata(sentencepiece_gguf_metadata(spm_model))


@pytest.fixture(scope="module")
def smol_tok() -> Tokenizer:
    return Tokenizer.from_gguf(default_model_path(progress=False))


# --- SentencePiece: Mistral v1 tokenizer.model vs sentencepiece ------------------------------------
def test_metadata_matches_sentencepiece(spm_model, sp):
    md = sentencepiece_gguf_metadata(spm_model)
    n = sp.vocab_size()
    assert md["tokenizer.ggml.model"] == "llama"
    assert md["tokenizer.ggml.tokens"] == [sp.id_to_piece(i) for i in range(n)]
    np.testing.assert_array_equal(md["tokenizer.ggml.scores"],
                                  np.array([sp.get_score(i) for i in range(n)], np.float32))
    expected_types = [TOKEN_CONTROL if sp.is_control(i) else TOKEN_UNKNOWN if sp.is_unknown(i)
                      else TOKEN_BYTE if sp.is_byte(i) else TOKEN_NORMAL for i in range(n)]
    assert md["tokenizer.ggml.token_type"].tolist() == expected_types
    assert md["tokenizer.ggml.token_type"].dtype == np.int32
    assert (md["tokenizer.ggml.bos_token_id"], md["tokenizer.ggml.eos_token_id"],
            md["tokenizer.ggml.unknown_token_id"]) == (sp.bos_id(), sp.eos_id(), sp.unk_id())
    assert md["tokenizer.ggml.add_bos_token"] is True and md["tokenizer.ggml.add_eos_token"] is False
    assert md["tokenizer.ggml.add_space_prefix"] is True


@pytest.mark.parametrize("text", CORPUS)
def test_spm_ids_and_decode_match_sentencepiece(spm_tok, sp, text):
    ids = spm_tok.encode(text)
    assert ids == sp.encode(text)
    assert spm_tok.decode(ids) == sp.decode(ids) == text


def test_spm_special_tokens(spm_tok, sp):
    text = "<s>[INST] hi [/INST]</s>"
    # Control tokens are text unless asked for.
    assert spm_tok.encode(text) == sp.encode(text)
    # Parsed: the prefix space goes at the start of each run of text after a special token.
    assert spm_tok.encode(text, parse_special=True) == [sp.bos_id(), *sp.encode("[INST] hi [/INST]"),
                                                         sp.eos_id()]
    assert spm_tok.encode("hi", add_special_tokens=True) == [sp.bos_id(), *sp.encode("hi")]
    assert (spm_tok.bos_id, spm_tok.eos_id) == (sp.bos_id(), sp.eos_id())
    assert spm_tok.stop_ids == {sp.eos_id()}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(st.characters(codec="utf-8", categories=("L", "N", "P", "S", "Z", "Cc", "M")),
               max_size=80))
def test_spm_random_text_matches_sentencepiece(spm_tok, sp, text):
    assert spm_tok.encode(text) == sp.encode(text)


def test_spm_tokenizer_json_override(spm_tok, sp, spm_model, tmp_path):
    # A tokenizer.json replaces the GGUF's vocabulary; sentencepiece stays the oracle.
    path = tmp_path / "tokenizer.json"
    path.write_text(spm_tok._parsing_backend.to_str())
    tok = Tokenizer.from_tokenizer_json(path, sentencepiece_gguf_metadata(spm_model))
    for text in CORPUS:
        assert tok.encode(text) == sp.encode(text)
        assert tok.decode(sp.encode(text)) == text
    assert tok.encode("x", add_special_tokens=True)[0] == sp.bos_id()


# --- byte-level BPE: SmolLM2 GGUF ----------------------------------------------------------------
@pytest.mark.parametrize("text", CORPUS)
def test_smollm_round_trip(smol_tok, text):
    assert smol_tok.decode(smol_tok.encode(text)) == text


def test_smollm_pre_tokenizer_and_specials(smol_tok):
    # The 'smollm' pre-tokenizer splits numbers into single digits.
    assert smol_tok.encode("2024") == [smol_tok.tokens.index(d) for d in "2024"]
    im_start, im_end = smol_tok.tokens.index("<|im_start|>"), smol_tok.tokens.index("<|im_end|>")
    assert smol_tok.encode("<|im_start|>x<|im_end|>", parse_special=True)[::2] == [im_start, im_end]
    assert im_start not in smol_tok.encode("<|im_start|>")
    assert im_end in smol_tok.stop_ids and smol_tok.eos_id in smol_tok.stop_ids
    assert smol_tok.encode("hi", add_special_tokens=True) == smol_tok.encode("hi")  # add_bos_token false


@pytest.fixture(scope="module")
def smol_metadata() -> dict:
    from mistral_ref.gguf import load_gguf
    return load_gguf(default_model_path(progress=False)).metadata


# Pre-token splits of PRE_TEXT worked out by hand from llama.cpp's regexes for each `pre`.
PRE_TEXT = "x.Hello CamelCase 12345!!\n\n"
PRE_SPLITS = {
    "gpt-2": ["x", ".", "Hello", " CamelCase", " 12345", "!!", "\n\n"],
    "smollm": ["x", ".", "Hello", " CamelCase", " ", *"12345", "!!", "\n\n"],
    "default": ["x", ".", "Hello", " CamelCase", " ", "123", "45", "!!", "\n\n"],
    "llama-bpe": ["x", ".Hello", " CamelCase", " ", "123", "45", "!!\n\n"],
    "qwen2": ["x", ".Hello", " CamelCase", " ", *"12345", "!!\n\n"],
    "tekken": ["x", ".Hello", " Camel", "Case", " ", *"12345", "!!\n\n"],
}


@pytest.mark.parametrize("pre", sorted(PRE_SPLITS))
def test_every_pre_tokenizer(smol_metadata, pre):
    tok = Tokenizer.from_metadata({**smol_metadata, "tokenizer.ggml.pre": pre})
    pieces = tok._parsing_backend.pre_tokenizer.pre_tokenize_str(PRE_TEXT)
    byte_level = str.maketrans({" ": "\u0120", "\n": "\u010a"})  # GPT-2's spelling of space, LF
    assert [p for p, _ in pieces] == [s.translate(byte_level) for s in PRE_SPLITS[pre]]
    for text in CORPUS:
        assert tok.decode(tok.encode(text)) == text


@pytest.fixture(scope="module")
def mistralrs_runner():
    mistralrs = pytest.importorskip("mistralrs")
    path = default_model_path(progress=False)
    return mistralrs.Runner(which=mistralrs.Which.GGUF(quantized_model_id=str(path.parent),
                                                       quantized_filename=path.name),
                            token_source="none")


@pytest.mark.oracle
def test_smollm_matches_mistralrs(smol_tok, mistralrs_runner):
    rng = random.Random(0)
    alphabet = "ab Z\n\t  😀你é<|>'s0123" + "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(100))
    texts = CORPUS + ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 120)))
                      for _ in range(300)]
    for text in texts:
        ids = smol_tok.encode(text, parse_special=True)  # mistralrs always parses special tokens
        assert ids == mistralrs_runner.tokenize_text(text, False, None), text
        assert smol_tok.decode(ids) == mistralrs_runner.detokenize_text(ids, False)


# --- incremental detokenizer ---------------------------------------------------------------------
def _check_stream(tok: Tokenizer, ids: list[int], skip_special_tokens: bool) -> str:
    detok = IncrementalDetokenizer(tok, skip_special_tokens)
    deltas = [detok.add(i) for i in ids]
    tail = detok.flush()
    full = tok.decode(ids, skip_special_tokens)
    assert "".join(deltas) + tail == full
    # Text is emitted as soon as it is final: whenever the bytes so far are complete UTF-8, all of
    # their text is out.
    data = bytearray()
    for k, i in enumerate(ids):
        data += tok.token_bytes(i, skip_special_tokens)
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        assert "".join(deltas[:k + 1]) == tok.decode(ids[:k + 1], skip_special_tokens)
    return full


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.integers(1, 31999), max_size=40), st.booleans())
def test_spm_stream_matches_full_decode_and_sentencepiece(spm_tok, sp, ids, skip):
    full = _check_stream(spm_tok, ids, skip)
    if skip:  # sentencepiece drops control tokens
        assert full == sp.decode(ids)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.integers(0, 49151), max_size=40), st.booleans())
def test_smollm_stream_matches_full_decode(smol_tok, ids, skip):
    _check_stream(smol_tok, ids, skip)


def test_stream_never_splits_a_character(spm_tok, sp):
    ids = sp.encode("🧋")  # not in the vocabulary: four byte-fallback tokens
    assert sum(sp.is_byte(i) for i in ids) == 4
    detok = IncrementalDetokenizer(spm_tok)
    assert [detok.add(i) for i in ids][-4:] == ["", "", "", "🧋"] and detok.flush() == ""
    # cut after 2 of its 4 bytes: decode shows U+FFFD per byte (as SentencePiece does); generated
    # text (flush(drop_unfinished=True)) shows nothing of the character
    for drop, tail in ((False, "\ufffd\ufffd"), (True, "")):
        detok = IncrementalDetokenizer(spm_tok)
        assert "".join(detok.add(i) for i in ids[:-2]) + detok.flush(drop) == tail


# --- bad input -----------------------------------------------------------------------------------
def test_bad_input_errors(spm_tok, spm_model, tmp_path):
    md = sentencepiece_gguf_metadata(spm_model)
    with pytest.raises(TokenizerError, match="unknown tokenizer model"):
        Tokenizer.from_metadata({**md, "tokenizer.ggml.model": "t5"})
    gpt2 = {**md, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.merges": [], "tokenizer.ggml.pre": "nope"}
    with pytest.raises(TokenizerError, match="unknown pre-tokenizer.*'nope'"):
        Tokenizer.from_metadata(gpt2)
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        spm_tok.decode([5, 32000])
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        spm_tok.decode([-1])
    with pytest.raises(TokenizerError, match="no tokenizer.ggml.tokens"):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "llama"})
    garbage = tmp_path / "bad.model"
    garbage.write_bytes(b"\x0a\xff\xff\xff\xff\x0f")
    with pytest.raises(TokenizerError):
        sentencepiece_gguf_metadata(garbage)
    not_json = tmp_path / "tokenizer.json"
    not_json.write_text(json.dumps({"model": 1}))
    with pytest.raises(TokenizerError):
        Tokenizer.from_tokenizer_json(not_json)
    assert issubclass(TokenizerError, MistralRefError) and issubclass(TokenizerError, ValueError)
