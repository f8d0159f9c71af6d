"""User-provided input files (mistralrs.InputFile and `ChatCompletionRequest(input_files=...)`).

As mistral.rs does (mistralrs-core/src/files/mod.rs `File::from_bytes`, files/inject.rs
`input_files_message`, engine/agentic_loop.rs `inject_input_files_message`): a file whose bytes
are valid UTF-8 is text, anything else binary. A request's files become one system message put
before its messages: a header, then per file a line `- name (id=..., mime=..., bytes=...)`
and, for text, a preview of its first 4096 characters (32768 over all files of a request) with a
note when the preview is cut. A binary file gets its line only. mistral-ref runs no file tools,
code or shell, so the message is the one mistral.rs sends when no workdir is mounted (its default
Python build); the note's `mistralrs_read_file` tool is mistral.rs's, which mistral-ref lacks.
"""
from __future__ import annotations

import base64
import binascii
import json
import os
import urllib.parse
import uuid
from collections.abc import Mapping
from typing import Any

from mistral_ref.errors import InvalidRequestError

INPUT_FILE_PREVIEW_CHARS = 4 * 1024  # mistral.rs's, per file
INPUT_FILES_TOTAL_PREVIEW_CHARS = 32 * 1024  # mistral.rs's, per request
MAX_INPUT_FILE_BYTES = 64 * 1024 * 1024  # mistral.rs server's MAX_MEDIA_BYTES

# The first MIME type mime_guess 2.0.5 (mistral.rs's) gives these extensions; others are
# application/octet-stream here. The type only labels the file: text or binary is UTF-8 validity.
_MIME_TYPES = {
    "7z": "application/x-7z-compressed", "avi": "video/x-msvideo", "bin": "application/octet-stream",
    "bmp": "image/bmp", "bz2": "application/x-bzip2", "c": "text/plain", "cc": "text/plain",
    "cfg": "text/plain", "conf": "text/plain", "cpp": "text/plain", "cs": "text/plain",
    "css": "text/css", "csv": "text/csv", "doc": "application/msword",
    "exe": "application/octet-stream", "flac": "audio/flac", "geojson": "application/geo+json",
    "gif": "image/gif", "gz": "application/gzip", "h": "text/plain", "hpp": "text/plain",
    "htm": "text/html", "html": "text/html", "ico": "image/x-icon", "ini": "text/plain",
    "jar": "application/java-archive", "java": "application/octet-stream", "jpeg": "image/jpeg",
    "jpg": "image/jpeg", "js": "text/javascript", "json": "application/json", "jsx": "text/javascript",
    "log": "text/plain", "lua": "text/x-lua", "m4a": "audio/m4a", "md": "text/markdown",
    "mjs": "application/javascript", "mkv": "video/x-matroska", "mov": "video/quicktime",
    "mp3": "audio/mpeg", "mp4": "video/mp4", "odp": "application/vnd.oasis.opendocument.presentation",
    "ods": "application/vnd.oasis.opendocument.spreadsheet",
    "odt": "application/vnd.oasis.opendocument.text", "ogg": "audio/ogg",
    "parquet": "application/vnd.apache.parquet", "pdf": "application/pdf",
    "php": "application/x-httpd-php", "pl": "application/x-perl", "png": "image/png",
    "ppt": "application/vnd.ms-powerpoint", "py": "text/plain", "rar": "application/x-rar-compressed",
    "rs": "text/x-rust", "rtf": "application/rtf", "sh": "application/x-sh",
    "sql": "application/x-sql", "svg": "image/svg+xml", "tar": "application/x-tar",
    "tex": "application/x-tex", "tgz": "application/x-compressed", "tif": "image/tiff",
    "tiff": "image/tiff", "toml": "text/x-toml", "ts": "video/vnd.dlna.mpeg-tts",
    "tsv": "text/tab-separated-values", "txt": "text/plain", "wasm": "application/wasm",
    "wav": "audio/wav", "webm": "video/webm", "webp": "image/webp", "xhtml": "application/xhtml+xml",
    "xls": "application/vnd.ms-excel", "xml": "text/xml", "xz": "application/x-xz",
    "yaml": "text/x-yaml", "zip": "application/zip",
    # mistral.rs's own entries and aliases (files/mod.rs mime_for_format)
    "pptx": "application/vnd.openxmlformats-officedocument.presentationml.presentation",
    "docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
}
_ALIASES = {"markdown": "md", "yml": "yaml", "latex": "tex", "python": "py", "rust": "rs",
            "vega-lite": "json", "vega": "json", "geojson": "json", "text": "txt"}


def mime_for_name(name: str) -> str:
    """The MIME type mistral.rs gives a file called `name` when none is given."""
    if "." not in name:
        return "application/octet-stream"
    ext = name.rsplit(".", 1)[1].lower()
    return _MIME_TYPES.get(_ALIASES.get(ext, ext), "application/octet-stream")


class InputFile:
    """A user-provided file attached to a chat request (mistralrs.InputFile).

    Text-like (UTF-8) files are previewed in the prompt; binary files appear by name, type and
    size only. `InputFile(name, data, mime_type=None)` takes bytes; `from_text` and `from_path`
    are the other constructors. Read-only: id ("file-" + 32 hex digits), name, mime_type, bytes.
    """

    __slots__ = ("_id", "_name", "_mime_type", "_data", "_text")

    def __init__(self, name: str, data: bytes, mime_type: str | None = None) -> None:
        if not isinstance(name, str):
            raise TypeError(f"InputFile name must be a str, got {type(name).__name__}")
        if isinstance(data, str) or not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"InputFile data must be bytes (InputFile.from_text takes a str), "
                            f"got {type(data).__name__}")
        if mime_type is not None and not isinstance(mime_type, str):
            raise TypeError(f"InputFile mime_type must be a str or None, got {type(mime_type).__name__}")
        self._id = f"file-{uuid.uuid4().hex}"
        self._name = name
        self._mime_type = mime_type if mime_type is not None else mime_for_name(name)
        self._data = bytes(data)
        try:
            self._text: str | None = self._data.decode("utf-8")
        except UnicodeDecodeError:
            self._text = None

    @staticmethod
    def from_text(name: str, text: str, mime_type: str = "text/plain") -> InputFile:
        """A text file: `text` encoded as UTF-8."""
        if not isinstance(text, str):
            raise TypeError(f"InputFile.from_text text must be a str, got {type(text).__name__}")
        return InputFile(name, text.encode("utf-8"), mime_type)

    @staticmethod
    def from_path(path: str | os.PathLike, mime_type: str | None = None, name: str | None = None) -> InputFile:
        """The file at `path`, read now; `name` defaults to its file name. A missing or unreadable
        file raises OSError (FileNotFoundError, ...) naming the path, as mistral.rs does."""
        with open(path, "rb") as f:
            data = f.read()
        if name is None:
            name = os.path.basename(os.fspath(path)) or "input_file"
        return InputFile(name, data, mime_type)

    @property
    def id(self) -> str:
        return self._id

    @property
    def name(self) -> str:
        return self._name

    @property
    def mime_type(self) -> str | None:
        return self._mime_type

    @property
    def bytes(self) -> int:
        return len(self._data)

    @property
    def text(self) -> str | None:
        """The decoded text; None for a binary file. (An extension: mistralrs.InputFile has no text.)"""
        return self._text

    def __repr__(self) -> str:  # mistral.rs's format, Rust's Debug of an Option<String>
        return (f"InputFile(id={json.dumps(self._id)}, name={json.dumps(self._name, ensure_ascii=False)}, "
                f"mime_type=Some({json.dumps(self._mime_type, ensure_ascii=False)}), bytes={self.bytes})")


def check_input_files(files: Any, messages: Any) -> None:
    """InvalidRequestError unless `files` is None or a list of InputFile and, when there are
    files, `messages` is a list (a str prompt is already templated: no message can be added)."""
    if files is None:
        return
    if not isinstance(files, (list, tuple)):
        raise InvalidRequestError("input_files", f"must be a list of InputFile, got {type(files).__name__}")
    for i, f in enumerate(files):
        if not isinstance(f, InputFile):
            raise InvalidRequestError("input_files", f"item #{i} must be an InputFile (InputFile(name, data), "
                                                     f"InputFile.from_text, InputFile.from_path), "
                                                     f"got {type(f).__name__}")
    if files and isinstance(messages, str):
        raise InvalidRequestError("input_files", "need messages as a list: a str prompt is taken as "
                                                 "already templated, so the files' system message cannot be added")


def input_files_message(files: list[InputFile]) -> str | None:
    """The system message mistral.rs adds for `files` (None for none): its input_files_message
    without the shell/code workdir paths, which mistral-ref never mounts."""
    if not files:
        return None
    remaining = INPUT_FILES_TOTAL_PREVIEW_CHARS
    out = ["User-provided input files are available in this session.\n",
           "\nFor mistralrs_read_file, use file ids. mistralrs_read_file reads the internal file "
           "store by id; it does not read shell filesystem paths.\n\nInput files:\n"]
    for f in files:
        out.append(f"- {f.name} (id={f.id}, mime={f.mime_type}, bytes={f.bytes})")
        if remaining > 0 and f.text is not None:
            preview = f.text[:INPUT_FILE_PREVIEW_CHARS][:remaining]
            remaining -= len(preview)
            out.append("\n  Preview:\n" + preview)
            if len(f.text) > len(preview):
                out.append(f"\n  Preview truncated. Use mistralrs_read_file(file_id=\"{f.id}\", "
                           f"start={len(preview)}) to continue.")
        out.append("\n")
    return "".join(out)


def with_input_files(messages: list, files: list[InputFile] | None) -> list:
    """`messages` with the files' system message first, as mistral.rs inserts it."""
    content = input_files_message(list(files or []))
    return messages if content is None else [{"role": "system", "content": content}, *messages]


# -- the HTTP server's `file` content parts ------------------------------------------------------
def _decode_file_data(data: str) -> tuple[bytes, str | None]:
    """mistral.rs's decode_file_data: a data URL (its MIME type kept) or plain base64."""
    try:
        if data.startswith("data:"):
            header, comma, payload = data[len("data:"):].partition(",")
            if not comma:
                raise ValueError("a data URL needs a ','")
            mime = header.split(";")[0] or None
            raw = (base64.b64decode(payload, validate=True) if header.strip().lower().endswith(";base64")
                   else urllib.parse.unquote_to_bytes(payload))
        else:
            mime, raw = None, base64.b64decode(data, validate=True)
    except (ValueError, binascii.Error) as e:
        raise InvalidRequestError("messages", f"input_file.file_data must be base64 or a data URL ({e})") from None
    if len(raw) > MAX_INPUT_FILE_BYTES:
        raise InvalidRequestError("messages", f"Input file exceeds the {MAX_INPUT_FILE_BYTES} byte limit.")
    return raw, mime


def file_from_part(file: Any) -> InputFile:
    """The InputFile of a Chat Completions content part {"type": "file", "file": {...}}, as
    mistral.rs's server resolves it: `file_data` (base64 or a data URL) with `filename`
    (default "input_file"). `file_id` names a file uploaded to mistral.rs's /v1/files, which
    mistral-ref's server does not have; `file_url` mistral.rs refuses on Chat Completions."""
    if not isinstance(file, Mapping):
        raise InvalidRequestError("messages", "File sub-content `file` key must be an object.")
    if file.get("file_url") is not None:
        raise InvalidRequestError("messages", "Chat Completions file content does not support `file_url`; "
                                              "use Responses `input_file`.")
    if file.get("file_id") is not None:
        raise InvalidRequestError("messages", f"Input file `{file['file_id']}` was not found (mistral-ref's "
                                              f"server has no /v1/files uploads: send `file_data`).")
    data = file.get("file_data")
    if data is None:
        raise InvalidRequestError("messages", "Input file requires one of `file_id`, `file_data`, or `file_url`.")
    if not isinstance(data, str):
        raise InvalidRequestError("messages", "input_file.file_data must be base64 or a data URL")
    raw, mime = _decode_file_data(data)
    name = file.get("filename")
    return InputFile(name if isinstance(name, str) else "input_file", raw, mime)


def split_file_parts(messages: list) -> tuple[list, list[InputFile]]:
    """OpenAI chat messages with their `file` content parts taken out, and those files in order.
    Messages without file parts are kept as they are."""
    out, files = [], []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, Mapping) else None
        if not isinstance(content, list) or not any(isinstance(p, Mapping) and p.get("type") == "file"
                                                    for p in content):
            out.append(m)
            continue
        if m.get("role") != "user":
            raise InvalidRequestError("messages", f"message #{i}: Role for a file message must be `user`, "
                                                  f"but it is {m.get('role')}")
        rest = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "file":
                if "file" not in part:
                    raise InvalidRequestError("messages", "File sub-content must have `file` key.")
                files.append(file_from_part(part["file"]))
            else:
                rest.append(part)
        out.append({**m, "content": rest})
    return out, files
