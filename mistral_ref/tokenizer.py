"""Tokenizers built from GGUF `tokenizer.ggml.*` metadata, and SentencePiece `.model` files read
into that metadata.

A GGUF file is enough: no tokenizer.json, no hub.
"""
from __future__ import annotations

import codecs
import json
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from mistral_ref.errors import TokenizerError

# llama.cpp's token types (gguf.TokenType); SentencePiece's ModelProto.SentencePiece.Type uses the
# same numbers, so a piece's type is copied through unchanged.
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# --- SentencePiece .model files ------------------------------------------------------------------
# A .model file is one protobuf ModelProto. The fields read here (sentencepiece_model.proto):
#   ModelProto:      1 pieces (repeated SentencePiece), 2 trainer_spec, 3 normalizer_spec
#   SentencePiece:   1 piece (string), 2 score (float), 3 type (enum, default NORMAL)
#   TrainerSpec:     3 model_type (1 unigram, 2 BPE, 3 word, 4 char), 35 byte_fallback,
#                    40 unk_id, 41 bos_id, 42 eos_id, 43 pad_id (int32, -1 = none)
#   NormalizerSpec:  3 add_dummy_prefix (default true), 4 remove_extra_whitespaces (default true)
_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5
_SPM_BPE = 2


def _protobuf_fields(buf: bytes, what: str) -> list[tuple[int, int | bytes]]:
    """Decode one protobuf message into (field number, value) pairs, in file order.

    Varints come back as unsigned ints, fixed32/fixed64 as their little-endian bytes, and
    length-delimited fields (strings, sub-messages) as bytes.
    """
    fields: list[tuple[int, int | bytes]] = []
    pos, end = 0, len(buf)

    def varint() -> int:
        nonlocal pos
        value = shift = 0
        while True:
            if pos >= end:
                raise TokenizerError(f"{what}: truncated protobuf varint")
            byte = buf[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
            shift += 7

    while pos < end:
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == _VARINT:
            value: int | bytes = varint()
        elif wire in (_FIXED64, _FIXED32, _BYTES):
            n = {_FIXED64: 8, _FIXED32: 4}.get(wire) or varint()
            if pos + n > end:
                raise TokenizerError(f"{what}: protobuf field {field} runs past the end")
            value, pos = buf[pos:pos + n], pos + n
        else:
            raise TokenizerError(f"{what}: unsupported protobuf wire type {wire} (field {field})")
        fields.append((field, value))
    return fields


def _int32(varint: int) -> int:
    """Reinterpret a protobuf int32 varint (negative numbers are sent as 64-bit two's complement)."""
    return varint - (1 << 64) if varint >= 1 << 63 else varint


def sentencepiece_gguf_metadata(model_path: str | os.PathLike) -> dict[str, Any]:
    """Read a SentencePiece BPE `.model` file into the GGUF `tokenizer.ggml.*` metadata that
    llama.cpp's convert_hf_to_gguf.py writes for it (as for Mistral-7B v0.1).

    Returns a dict with:
      tokenizer.ggml.model "llama", tokenizer.ggml.pre "default",
      tokenizer.ggml.tokens list[str] (n_vocab), tokenizer.ggml.scores float32 (n_vocab,),
      tokenizer.ggml.token_type int32 (n_vocab,) with llama.cpp's codes (TOKEN_NORMAL ...),
      tokenizer.ggml.{bos,eos,unknown}_token_id int (and padding_token_id when the model has one),
      tokenizer.ggml.add_bos_token True, add_eos_token False,
      tokenizer.ggml.add_space_prefix bool (the model's add_dummy_prefix).
    Parses the protobuf directly, so `sentencepiece` is not needed at run time.
    Raises TokenizerError if the file is not a SentencePiece BPE model.
    """
    with open(model_path, "rb") as f:
        buf = f.read()
    what = str(model_path)
    tokens: list[str] = []
    scores: list[float] = []
    types: list[int] = []
    ids = {"unk": 0, "bos": 1, "eos": 2, "pad": -1}  # TrainerSpec defaults
    model_type, add_dummy_prefix, remove_extra_whitespaces = 1, True, True
    for field, value in _protobuf_fields(buf, what):
        if not isinstance(value, bytes):
            continue
        if field == 1:
            piece, score, ptype = None, 0.0, TOKEN_NORMAL
            for f, v in _protobuf_fields(value, f"{what} piece #{len(tokens)}"):
                if f == 1 and isinstance(v, bytes):
                    piece = v.decode("utf-8")
                elif f == 2 and isinstance(v, bytes):
                    score = struct.unpack("<f", v)[0]
                elif f == 3 and isinstance(v, int):
                    ptype = v
            if piece is None:
                raise TokenizerError(f"{what}: piece #{len(tokens)} has no text")
            tokens.append(piece)
            scores.append(score)
            types.append(ptype)
        elif field == 2:
            for f, v in _protobuf_fields(value, f"{what} trainer_spec"):
                if f == 3 and isinstance(v, int):
                    model_type = v
                elif f in (40, 41, 42, 43) and isinstance(v, int):
                    ids[("unk", "bos", "eos", "pad")[f - 40]] = _int32(v)
        elif field == 3:
            for f, v in _protobuf_fields(value, f"{what} normalizer_spec"):
                if f == 3 and isinstance(v, int):
                    add_dummy_prefix = bool(v)
                elif f == 4 and isinstance(v, int):
                    remove_extra_whitespaces = bool(v)
    if not tokens:
        raise TokenizerError(f"{what}: not a SentencePiece model (no pieces)")
    if model_type != _SPM_BPE:
        raise TokenizerError(f"{what}: SentencePiece model type {model_type} is not BPE (2); "
                             "only BPE models map to llama.cpp's 'llama' tokenizer")
    if remove_extra_whitespaces:
        # llama.cpp never collapses whitespace; such a model would tokenize differently there.
        raise TokenizerError(f"{what}: remove_extra_whitespaces models are not supported")
    md: dict[str, Any] = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": np.array(scores, dtype=np.float32),
        "tokenizer.ggml.token_type": np.array(types, dtype=np.int32),
        "tokenizer.ggml.bos_token_id": ids["bos"],
        "tokenizer.ggml.eos_token_id": ids["eos"],
        "tokenizer.ggml.unknown_token_id": ids["unk"],
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
        "tokenizer.ggml.add_space_prefix": add_dummy_prefix,
    }
    if ids["pad"] >= 0:
        md["tokenizer.ggml.padding_token_id"] = ids["pad"]
    return md


# --- Pre-tokenizers of byte-level BPE ("gpt2") vocabularies ----------------------------------------
# llama.cpp's regexes per `tokenizer.ggml.pre` (llama-vocab.cpp). Each list is applied in order, every
# regex splitting the pieces the previous one produced; text no regex matches stays a piece of its own.
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_REGEX = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
                 r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
                r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Tekken's regex as in its tokenizer.json (llama.cpp rewrites it only because std::regex lacks \p{Lu}).
_TEKKEN_REGEX = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class _PreTokenizer:
    regexes: tuple[str, ...]
    ignore_merges: bool = False  # a word that is itself a token is emitted whole, unmerged
    add_bos: bool = False  # llama.cpp's add_bos_token default when the file does not say


_PRE_TOKENIZERS: dict[str, _PreTokenizer] = {
    "default": _PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _GPT2_REGEX, r"\p{N}+", r"[0-9][0-9][0-9]")),
    "llama-bpe": _PreTokenizer((_LLAMA3_REGEX,), ignore_merges=True, add_bos=True),
    "smollm": _PreTokenizer((r"\p{N}", _GPT2_REGEX)),
    "gpt-2": _PreTokenizer((_GPT2_REGEX,)),
    "qwen2": _PreTokenizer((_QWEN2_REGEX,)),
    "tekken": _PreTokenizer((_TEKKEN_REGEX,), ignore_merges=True, add_bos=True),
}
_PRE_TOKENIZERS["llama3"] = _PRE_TOKENIZERS["llama-v3"] = _PRE_TOKENIZERS["llama-bpe"]
_PRE_TOKENIZERS["starcoder"] = _PRE_TOKENIZERS["smollm"]

# Tokens llama.cpp recognises as end-of-turn by their text when the file names no eot id.
_EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
              "<|end_of_text|>", "<EOT>")


def _byte_level_alphabet() -> list[str]:
    """GPT-2's byte -> printable character map: byte b is spelled `alphabet[b]` in gpt2 vocabularies.

    Printable Latin-1 bytes stand for themselves; the others (controls, space, ...) are shifted to
    U+0100 and up, in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    alphabet, shifted = [""] * 256, 0
    for b in range(256):
        if b in printable:
            alphabet[b] = chr(b)
        else:
            alphabet[b] = chr(256 + shifted)
            shifted += 1
    return alphabet


def _byte_token(piece: str) -> int | None:
    """The byte an SPM byte-fallback piece `<0xNN>` stands for, else None."""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return int(piece[3:5], 16)
        except ValueError:
            return None
    return None


class Tokenizer:
    """Text <-> token ids for a GGUF model, with llama.cpp's semantics.

    Build with `from_gguf(path)`, `from_metadata(md)` or `from_tokenizer_json(path, md)`.
    Encoding runs in the `tokenizers` library (Rust); decoding maps every id to its bytes here, so
    full and incremental decoding (`IncrementalDetokenizer`) share one definition.
    """

    def __init__(self, backend: HFTokenizer, kind: str, tokens: list[str], token_types: np.ndarray,
                 bos_id: int | None, eos_id: int | None, eot_id: int | None, add_bos: bool,
                 add_eos: bool, add_space_prefix: bool, chat_template: str | None = None):
        """Low-level constructor; `kind` is "llama" (SentencePiece) or "gpt2" (byte-level BPE),
        `token_types` an int32 (n_vocab,) array of llama.cpp token types."""
        self.kind = kind
        self.tokens = tokens
        self.token_types = np.asarray(token_types, dtype=np.int32)
        self.bos_id, self.eos_id, self.eot_id = bos_id, eos_id, eot_id
        self.add_bos, self.add_eos = add_bos, add_eos
        self.add_space_prefix = add_space_prefix
        self.chat_template = chat_template
        # Ids that end generation (llama.cpp's end-of-generation set): EOS, EOT, and every control
        # token spelled like an end-of-turn marker ("<|im_end|>", "<|endoftext|>", ...).
        eot_like = (i for i, t in enumerate(tokens)
                    if t in _EOT_TEXTS and self.token_types[i] == TOKEN_CONTROL)
        self.stop_ids: frozenset[int] = frozenset(
            i for i in (eos_id, eot_id, *eot_like) if i is not None)
        # Two backends because `encode_special_tokens` is state on the object: sharing one and
        # flipping it per call would race between threads.
        self._parsing_backend = backend
        self._literal_backend = HFTokenizer.from_str(backend.to_str())
        self._literal_backend.encode_special_tokens = True
        self._piece_bytes = self._build_piece_bytes()

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> Tokenizer:
        """The tokenizer stored in a GGUF model file's `tokenizer.*` metadata (the file is opened
        with `load_gguf`, so it must be a loadable model; for bare metadata use `from_metadata`)."""
        from mistral_ref.gguf import load_gguf  # the loader imports nothing from here; keep it lazy
        return cls.from_metadata(load_gguf(path).metadata)

    @classmethod
    def from_metadata(cls, md: dict[str, Any]) -> Tokenizer:
        """Build from GGUF metadata (`tokenizer.ggml.*` keys, as `load_gguf(...).metadata` gives).

        Raises TokenizerError for a missing key, an unknown `tokenizer.ggml.model` or an unknown
        `tokenizer.ggml.pre`.
        """
        model = md.get("tokenizer.ggml.model")
        tokens = md.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list) or not tokens:
            raise TokenizerError("GGUF metadata has no tokenizer.ggml.tokens list")
        n = len(tokens)
        types = md.get("tokenizer.ggml.token_type")
        types = np.full(n, TOKEN_NORMAL, np.int32) if types is None else np.asarray(types, np.int32)
        if types.shape != (n,):
            raise TokenizerError(f"tokenizer.ggml.token_type has shape {types.shape}, expected ({n},)")
        if model == "llama":
            scores = md.get("tokenizer.ggml.scores")
            if scores is None or np.shape(scores) != (n,):
                raise TokenizerError("SentencePiece ('llama') GGUF tokenizer needs "
                                     f"tokenizer.ggml.scores of shape ({n},)")
            add_space_prefix = bool(md.get("tokenizer.ggml.add_space_prefix", True))
            backend = _spm_backend(tokens, np.asarray(scores, np.float32), types,
                                   md.get("tokenizer.ggml.unknown_token_id", 0), add_space_prefix)
            default_bos, default_eos, default_add_bos = 1, 2, True
        elif model == "gpt2":
            merges = md.get("tokenizer.ggml.merges")
            if not isinstance(merges, list):
                raise TokenizerError("byte-level BPE ('gpt2') GGUF tokenizer needs tokenizer.ggml.merges")
            pre = md.get("tokenizer.ggml.pre", "default")
            if pre not in _PRE_TOKENIZERS:
                raise TokenizerError(f"unknown pre-tokenizer tokenizer.ggml.pre = {pre!r} "
                                     f"(supported: {', '.join(sorted(_PRE_TOKENIZERS))})")
            add_space_prefix = False  # llama.cpp adds no space prefix to byte-level BPE text
            backend = _byte_level_backend(tokens, merges, types, _PRE_TOKENIZERS[pre])
            default_bos = default_eos = None
            default_add_bos = _PRE_TOKENIZERS[pre].add_bos
        else:
            raise TokenizerError(f"unknown tokenizer model tokenizer.ggml.model = {model!r} "
                                 "(supported: 'llama' (SentencePiece), 'gpt2' (byte-level BPE))")

        def token_id(key: str, default: int | None) -> int | None:
            value = md.get(f"tokenizer.ggml.{key}", default)
            if value is not None and not 0 <= value < n:
                raise TokenizerError(f"tokenizer.ggml.{key} = {value} is outside the vocabulary "
                                     f"(size {n})")
            return value

        eot_id = token_id("eot_token_id", None)
        if eot_id is None:  # as llama.cpp: find it by its text
            ids = {t: i for i, t in enumerate(tokens) if t in _EOT_TEXTS}
            eot_id = next((ids[t] for t in _EOT_TEXTS if t in ids), None)
        return cls(backend, model, tokens, types,
                   bos_id=token_id("bos_token_id", default_bos),
                   eos_id=token_id("eos_token_id", default_eos), eot_id=eot_id,
                   add_bos=bool(md.get("tokenizer.ggml.add_bos_token", default_add_bos)),
                   add_eos=bool(md.get("tokenizer.ggml.add_eos_token", False)),
                   add_space_prefix=add_space_prefix,
                   chat_template=md.get("tokenizer.chat_template"))

    @classmethod
    def from_tokenizer_json(cls, path: str | os.PathLike, md: dict[str, Any] | None = None) -> Tokenizer:
        """A HF `tokenizer.json` file overriding a GGUF's tokenizer (`Which(..., tokenizer_json=)`).

        The vocabulary, merges, pre-tokenizer and added tokens come from the file; BOS/EOS/EOT ids,
        add_bos/add_eos and the chat template still come from the GGUF metadata `md` when given.
        Raises TokenizerError if the file cannot be read or its decoder is neither byte-level nor
        SentencePiece-style.
        """
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for bad files
            raise TokenizerError(f"{path}: not a usable tokenizer.json ({e})") from None
        spec = json.loads(backend.to_str())
        decoder = json.dumps(spec.get("decoder"), ensure_ascii=False)
        if '"ByteLevel"' in decoder:
            kind = "gpt2"
        elif '"ByteFallback"' in decoder or '"Metaspace"' in decoder or "\u2581" in decoder:
            kind = "llama"
        else:
            raise TokenizerError(f"{path}: decoder {decoder} is neither byte-level nor SentencePiece")
        n = backend.get_vocab_size(with_added_tokens=True)
        tokens = [backend.id_to_token(i) or "" for i in range(n)]
        types = np.full(n, TOKEN_NORMAL, np.int32)
        for added in spec.get("added_tokens", []):
            types[added["id"]] = TOKEN_CONTROL if added.get("special") else TOKEN_USER_DEFINED
        if kind == "llama":
            types[[i for i, t in enumerate(tokens) if _byte_token(t) is not None]] = TOKEN_BYTE
        prefix_rules = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")])
        add_space_prefix = kind == "llama" and ('"Prepend"' in prefix_rules or
                                                '"prepend_scheme": "first"' in prefix_rules or
                                                '"prepend_scheme": "always"' in prefix_rules)
        md = md or {}

        def known(key: str) -> int | None:
            value = md.get(f"tokenizer.ggml.{key}")
            return value if value is not None and 0 <= value < n else None

        return cls(backend, kind, tokens, types, bos_id=known("bos_token_id"),
                   eos_id=known("eos_token_id"), eot_id=known("eot_token_id"),
                   add_bos=bool(md.get("tokenizer.ggml.add_bos_token", False)),
                   add_eos=bool(md.get("tokenizer.ggml.add_eos_token", False)),
                   add_space_prefix=add_space_prefix, chat_template=md.get("tokenizer.chat_template"))

    @classmethod
    def of_model(cls, source: Any, tokenizer_json: str | os.PathLike | None = None) -> Tokenizer:
        """The tokenizer of a loaded model file (a GGUFFile or Checkpoint: `model.file`): its
        tokenizer.json when it has one (a checkpoint's) or `tokenizer_json` is given, read with the
        file's metadata (BOS, EOS, chat template); else its GGUF tokenizer metadata."""
        tokenizer_json = tokenizer_json or getattr(source, "tokenizer_json", None)
        return (cls.from_tokenizer_json(tokenizer_json, source.metadata) if tokenizer_json
                else cls.from_metadata(source.metadata))

    def to_json(self) -> str:
        """The vocabulary, merges, pre-tokenizer and added tokens as a HF tokenizer.json (what
        `from_tokenizer_json` reads back); BOS/EOS and the chat template are not part of it."""
        return self._parsing_backend.to_str(pretty=True)

    # -- encoding ---------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def encode(self, text: str, add_special_tokens: bool = False,
               parse_special: bool | None = None) -> list[int]:
        """Token ids of `text`.

        add_special_tokens: add BOS/EOS as the model's add_bos_token/add_eos_token say.
        parse_special: recognise control tokens written in the text ("<s>", "<|im_start|>") as
          those tokens; otherwise they are tokenized as plain text. Defaults to add_special_tokens.
          User-defined tokens are always recognised, as in llama.cpp.
        """
        if parse_special is None:
            parse_special = add_special_tokens
        backend = self._parsing_backend if parse_special else self._literal_backend
        ids = backend.encode(text, add_special_tokens=False).ids if text else []
        if add_special_tokens and self.add_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if add_special_tokens and self.add_eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    # -- decoding ---------------------------------------------------------------------------------
    def _build_piece_bytes(self) -> list[bytes]:
        """The bytes each token id stands for: byte-fallback `<0xNN>` -> that byte, SPM `▁` -> space,
        gpt2 pieces through the inverse byte-level alphabet; control and user-defined tokens -> their
        text as is."""
        alphabet = {c: b for b, c in enumerate(_byte_level_alphabet())}
        out: list[bytes] = []
        for piece, ttype in zip(self.tokens, self.token_types.tolist()):
            if ttype in (TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNKNOWN, TOKEN_UNUSED):
                out.append(piece.encode("utf-8"))
            elif self.kind == "llama":
                byte = _byte_token(piece) if ttype == TOKEN_BYTE else None
                out.append(bytes([byte]) if byte is not None
                           else piece.replace("\u2581", " ").encode("utf-8"))
            elif all(c in alphabet for c in piece):
                out.append(bytes(alphabet[c] for c in piece))
            else:  # not byte-level spelled: a token added to the vocabulary as plain text
                out.append(piece.encode("utf-8"))
        return out

    def token_bytes(self, token_id: int, skip_special_tokens: bool = False) -> bytes:
        """The bytes one id decodes to, before any leading-space removal; b"" for a control token
        when skip_special_tokens. Raises TokenizerError for an id outside the vocabulary."""
        if not 0 <= token_id < len(self._piece_bytes):
            raise TokenizerError(f"token id {token_id} is outside the vocabulary "
                                 f"(size {len(self._piece_bytes)})")
        if skip_special_tokens and self.token_types[token_id] == TOKEN_CONTROL:
            return b""
        return self._piece_bytes[token_id]

    def strips_space(self, token_id: int) -> bool:
        """Whether `token_id`, as the first non-control token of a text, loses its leading space:
        SentencePiece semantics, undoing the space prefix `encode` adds."""
        return (self.add_space_prefix and self.token_types[token_id] == TOKEN_NORMAL
                and self._piece_bytes[token_id][:1] == b" ")

    def decode(self, ids: list[int] | np.ndarray, skip_special_tokens: bool = False) -> str:
        """Text of token ids (a list or 1-D int array). Each byte of invalid UTF-8 (a byte-fallback
        sequence cut short) decodes to one U+FFFD, as in SentencePiece.
        Raises TokenizerError for an id outside the vocabulary."""
        detok = IncrementalDetokenizer(self, skip_special_tokens)
        return "".join(detok.add(int(i)) for i in ids) + detok.flush()

    def __repr__(self) -> str:
        return (f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, eot_id={self.eot_id})")


def _replace_each_byte(err: UnicodeError) -> tuple[str, int]:
    # SentencePiece and tokenizers' ByteFallback turn every byte of an invalid UTF-8 sequence into
    # its own U+FFFD; Python's "replace" would give one per maximal invalid run.
    assert isinstance(err, UnicodeDecodeError)
    return "\ufffd" * (err.end - err.start), err.end


codecs.register_error("mistral_ref.replace_each_byte", _replace_each_byte)


class IncrementalDetokenizer:
    """Streaming decode: `add(id)` returns the text that became final with that token.

    Text is final once its UTF-8 bytes are complete, so a character spread over byte-fallback
    tokens is emitted whole, never split; "".join(add(i) for i in ids) + flush() == decode(ids).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="mistral_ref.replace_each_byte")
        self._at_start = True  # no non-control token seen yet: its leading space may be dropped

    def add(self, token_id: int) -> str:
        """Feed one id; returns the newly final text (possibly "")."""
        tok = self.tokenizer
        data = tok.token_bytes(token_id, self.skip_special_tokens)
        if self._at_start and tok.token_types[token_id] != TOKEN_CONTROL:
            if tok.strips_space(token_id):
                data = data[1:]
            self._at_start = False
        return self._utf8.decode(data)

    def flush(self, drop_unfinished: bool = False) -> str:
        """End of stream: each byte of an unfinished character comes out as U+FFFD (as `decode`
        and other tokenizers give it), or with `drop_unfinished` not at all (generated text cut
        by max_tokens inside a character: no part of a character is ever emitted)."""
        if drop_unfinished:
            self._utf8.reset()
            return ""
        return self._utf8.decode(b"", final=True)


# --- tokenizers backends -------------------------------------------------------------------------
def _added_tokens(tokens: list[str], types: np.ndarray) -> list[AddedToken]:
    """Control tokens are special (matched in text only when parsing specials); user-defined tokens
    are always matched. Neither is normalized: they match the raw text."""
    return [AddedToken(tokens[i], special=bool(types[i] == TOKEN_CONTROL), normalized=False)
            for i in np.flatnonzero((types == TOKEN_CONTROL) | (types == TOKEN_USER_DEFINED))]


def _spm_backend(tokens: list[str], scores: np.ndarray, types: np.ndarray, unk_id: int,
                 add_space_prefix: bool) -> HFTokenizer:
    """SentencePiece BPE as a `tokenizers` BPE model.

    llama.cpp/SentencePiece merge greedily: of all adjacent symbol pairs whose concatenation is a
    normal token, the one with the highest score first. A BPE merge list ranked by the merged
    token's score reproduces that: every split (left, right) of every normal token, both halves
    tokens themselves. Spaces become `▁`; the prefix `▁` is added to each run of text between
    special tokens (llama.cpp adds it at the start and after every special token).
    """
    vocab = {t: i for i, t in enumerate(tokens)}
    normal = np.flatnonzero(types == TOKEN_NORMAL)
    mergeable = {tokens[i] for i in normal} | {t for t in tokens if len(t) == 1}
    ranked: list[tuple[float, int, str, str]] = []
    for i in normal.tolist():
        piece = tokens[i]
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in mergeable and right in mergeable:
                ranked.append((-float(scores[i]), i, left, right))
    ranked.sort()
    merges = [(left, right) for _, _, left, right in ranked]
    unk = tokens[unk_id] if 0 <= unk_id < len(tokens) else None
    backend = HFTokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    steps = [normalizers.Prepend("\u2581")] if add_space_prefix else []
    backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "\u2581")])
    # Decoding is done by Tokenizer.decode; the decoder is set so that the backend saved as a
    # tokenizer.json is complete and recognisably SentencePiece-style.
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                         decoders.Fuse()])
    backend.add_tokens(_added_tokens(tokens, types))
    return backend


def _byte_level_backend(tokens: list[str], merges: list[str], types: np.ndarray,
                        pre: _PreTokenizer) -> HFTokenizer:
    """Byte-level BPE (GPT-2 style): split by the pre-tokenizer's regexes, spell bytes with the
    byte-level alphabet, merge by rank (the order of `merges`, "left right" strings)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = []
    for rank, merge in enumerate(merges):
        left, sep, right = merge.partition(" ")
        if not sep:
            raise TokenizerError(f"tokenizer.ggml.merges[{rank}] = {merge!r} is not 'left right'")
        pairs.append((left, right))
    try:
        model = models.BPE(vocab, pairs, ignore_merges=pre.ignore_merges)
    except Exception as e:  # tokenizers raises a bare Exception for inconsistent merges
        raise TokenizerError(f"byte-level BPE merges are inconsistent with the vocabulary ({e})") from None
    backend = HFTokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()  # as for the SentencePiece backend: a complete tokenizer.json
    backend.add_tokens(_added_tokens(tokens, types))
    return backend
