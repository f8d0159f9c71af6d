"""mistral.rs's InputFile and ChatCompletionRequest(input_files=...), and the HTTP server's
`file` content parts. The expected prompt text restates mistral.rs's source (quoted below), not
mistral_ref's output."""
from __future__ import annotations

import base64
import re

import pytest

from mistral_ref import ChatCompletionRequest, ChatTemplateError, InputFile, InvalidRequestError, Runner, Which
from mistral_ref.synth import synth_model

QUESTION = [{"role": "user", "content": "Which region has the highest revenue? Use the attached CSV."}]
SALES = "region,revenue\nnorth,120\nsouth,95\nwest,180\n"


def mistralrs_message(entries: list[str]) -> str:
    """The system message of mistral.rs's mistralrs-core/src/files/inject.rs input_files_message,
    without mounted workdir paths (a build without code-execution, as its Python wheel's default):

        let mut out = String::from("User-provided input files are available in this session.\\n");
        out.push_str("\\nFor mistralrs_read_file, use file ids. mistralrs_read_file reads the internal file \\
             store by id; it does not read shell filesystem paths.\\n\\nInput files:\\n");
        for f in files {
            out.push_str(&format!("- {} (id={}, mime={}, bytes={})", f.name, f.id, mime, f.bytes));
            ... out.push_str("\\n  Preview:\\n"); out.push_str(&preview);
            ... "\\n  Preview truncated. Use mistralrs_read_file(file_id=\\"{}\\", start={}) to continue."
            out.push('\\n');
        }

    `entries`: each file's text from its "- name" line up to (not including) its final newline."""
    return ("User-provided input files are available in this session.\n"
            "\nFor mistralrs_read_file, use file ids. mistralrs_read_file reads the internal file store "
            "by id; it does not read shell filesystem paths.\n\nInput files:\n"
            + "".join(e + "\n" for e in entries))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Runner:
    path = tmp_path_factory.mktemp("files") / "tiny.gguf"
    synth_model(path, "tiny", "Q4_K_M", sliding_window=16, seed=0, progress=False)
    return Runner(Which.GGUF(str(path)))


# -- InputFile --------------------------------------------------------------------------------
def test_constructors_and_fields(tmp_path):
    # mistralrs-pyo3/src/files.rs: new(name, data, mime_type=None); from_text(name, text,
    # mime_type="text/plain"); from_path(path, mime_type=None, name=None), name = the file name
    sales = InputFile.from_text("sales.csv", SALES, "text/csv")
    assert (sales.name, sales.mime_type, sales.bytes) == ("sales.csv", "text/csv", len(SALES))
    assert re.fullmatch(r"file-[0-9a-f]{32}", sales.id)  # File::make_upload_id: "file-" + uuid simple
    assert InputFile.from_text("notes", "héllo").mime_type == "text/plain"
    assert InputFile.from_text("notes", "héllo").bytes == 6  # bytes, not characters
    # no mime_type: mime_guess's type of the extension (files/mod.rs File::from_bytes)
    assert InputFile("a.json", b"{}").mime_type == "application/json"
    assert InputFile("a.PNG", b"\x89PNG").mime_type == "image/png"
    assert InputFile("a.unknownext", b"x").mime_type == "application/octet-stream"
    assert InputFile("noext", b"x").mime_type == "application/octet-stream"
    (tmp_path / "report.md").write_text("# Report\n")
    from_path = InputFile.from_path(str(tmp_path / "report.md"))
    assert (from_path.name, from_path.mime_type, from_path.bytes) == ("report.md", "text/markdown", 9)
    assert InputFile.from_path(tmp_path / "report.md", "text/plain", "r.txt").name == "r.txt"
    assert InputFile.from_text("a", "b").id != InputFile.from_text("a", "b").id
    assert repr(sales) == f'InputFile(id="{sales.id}", name="sales.csv", mime_type=Some("text/csv"), bytes=43)'


def test_bad_constructor_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        InputFile.from_path(str(tmp_path / "missing.csv"))
    with pytest.raises(TypeError, match="from_text"):
        InputFile("a.txt", "a str, not bytes")
    with pytest.raises(TypeError, match="text must be a str"):
        InputFile.from_text("a.txt", b"bytes")
    with pytest.raises(TypeError, match="name"):
        InputFile(None, b"x")


# -- the prompt -------------------------------------------------------------------------------
def test_example_request_puts_mistralrs_message_first(tiny):
    sales = InputFile.from_text("sales.csv", SALES, "text/csv")
    request = ChatCompletionRequest(messages=QUESTION, model="default", input_files=[sales], max_tokens=4)
    expected = mistralrs_message([f"- sales.csv (id={sales.id}, mime=text/csv, bytes={len(SALES)})\n  Preview:\n{SALES}"])
    # engine/agentic_loop.rs inject_input_files_message: messages.insert(0, {role: system, content})
    same = ChatCompletionRequest([{"role": "system", "content": expected}, *QUESTION], max_tokens=4)
    assert tiny.submit(request).job.prompt_ids == tiny.submit(same).job.prompt_ids
    response = tiny.send_chat_completion_request(request)  # the example's request runs
    assert response.choices[0].finish_reason in ("stop", "length")
    assert response.usage.prompt_tokens == len(tiny.submit(same).job.prompt_ids)
    # a conversation's own system message stays, after the files' one (mistral.rs merges
    # nothing): a template that takes one system message (the Mistral one) refuses both, as there
    with_system = [{"role": "system", "content": "Be brief."}, *QUESTION]
    with pytest.raises(ChatTemplateError, match="alternate"):
        tiny.submit(ChatCompletionRequest(with_system, input_files=[sales]))
    assert tiny.submit(ChatCompletionRequest(QUESTION, input_files=[])).job.prompt_ids == \
        tiny.submit(ChatCompletionRequest(QUESTION)).job.prompt_ids


def test_preview_limits_and_binary_files(tiny):
    # files/mod.rs: INPUT_FILE_PREVIEW_CHARS = 4 * 1024 (per file, in characters),
    # INPUT_FILES_TOTAL_PREVIEW_CHARS = 32 * 1024 (per request); binary files: metadata only
    from mistral_ref.input_files import input_files_message
    long = "é" * 5000
    big = InputFile.from_text("notes.txt", long)
    png = InputFile("plot.png", b"\x89PNG\r\n\x1a\n\xff\xfe")
    assert input_files_message([big, png]) == mistralrs_message([
        f"- notes.txt (id={big.id}, mime=text/plain, bytes=10000)\n  Preview:\n" + "é" * 4096
        + f"\n  Preview truncated. Use mistralrs_read_file(file_id=\"{big.id}\", start=4096) to continue.",
        f"- plot.png (id={png.id}, mime=image/png, bytes=10)"])
    # the request budget: 8 full previews use 32768 characters; the 9th file gets its line only
    files = [InputFile.from_text(f"f{i}.txt", "x" * 4096) for i in range(9)]
    entries = [f"- f{i}.txt (id={f.id}, mime=text/plain, bytes=4096)\n  Preview:\n" + "x" * 4096
               for i, f in enumerate(files[:8])]
    assert input_files_message(files) == mistralrs_message(
        entries + [f"- f8.txt (id={files[8].id}, mime=text/plain, bytes=4096)"])
    # a budget that runs out inside a preview cuts it and says where to continue
    cut = [InputFile.from_text(f"g{i}.txt", "y" * 4096) for i in range(7)]
    cut += [InputFile.from_text("w.txt", "w" * 3000), InputFile.from_text("z.txt", "z" * 6000)]
    text = input_files_message(cut)  # 32768 - 7 * 4096 - 3000 = 1096 characters left for z.txt
    assert text.endswith("bytes=6000)\n  Preview:\n" + "z" * 1096 + "\n  Preview truncated. Use "
                         f"mistralrs_read_file(file_id=\"{cut[8].id}\", start=1096) to continue.\n")
    # valid UTF-8 is text whatever the MIME type says (File::from_bytes)
    as_text = InputFile("data.bin", b"plain words", "application/octet-stream")
    assert "  Preview:\nplain words" in input_files_message([as_text])
    request = ChatCompletionRequest(QUESTION, input_files=[png], max_tokens=2)
    assert tiny.send_chat_completion_request(request).choices


def test_bad_input_files_are_refused():
    with pytest.raises(InvalidRequestError, match=r"input_files: item #1 must be an InputFile.*got str"):
        ChatCompletionRequest(QUESTION, input_files=[InputFile.from_text("a.txt", "a"), "b.txt"])
    with pytest.raises(InvalidRequestError, match="input_files: must be a list"):
        ChatCompletionRequest(QUESTION, input_files=InputFile.from_text("a.txt", "a"))
    with pytest.raises(InvalidRequestError, match="input_files: need messages as a list"):
        ChatCompletionRequest("[INST] hi [/INST]", input_files=[InputFile.from_text("a.txt", "a")])


# -- the HTTP body: Chat Completions `file` content parts ----------------------------------------
def file_body(file: dict, text: str = "Summarize this report.") -> dict:
    # mistral.rs's examples/server/file_inputs.py
    return {"model": "default", "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "file", "file": file}, {"type": "text", "text": text}]}]}


def test_file_parts_become_input_files():
    data = base64.b64encode(b'{"warnings": 2}').decode()
    request = ChatCompletionRequest.from_openai(file_body(
        {"filename": "report.json", "file_data": f"data:application/json;base64,{data}"}))
    (f,) = request.input_files
    assert (f.name, f.mime_type, f.bytes, f.text) == ("report.json", "application/json", 15, '{"warnings": 2}')
    assert request.messages == [{"role": "user", "content": [{"type": "text", "text": "Summarize this report."}]}]
    # plain base64, no filename: server-core/src/input_files.rs names it "input_file"
    (g,) = ChatCompletionRequest.from_openai(file_body({"file_data": data})).input_files
    assert (g.name, g.mime_type) == ("input_file", "application/octet-stream")
    assert ChatCompletionRequest.from_openai({"messages": QUESTION}).input_files is None


@pytest.mark.parametrize("file, message", [
    ({"file_url": "https://example.com/a.csv"}, "does not support `file_url`"),
    ({"file_id": "file-abc"}, "Input file `file-abc` was not found"),
    ({"filename": "a.txt"}, "requires one of `file_id`, `file_data`, or `file_url`"),
    ({"file_data": "not base64!"}, "must be base64 or a data URL"),
    ("a string", "`file` key must be an object"),
])
def test_bad_file_parts_are_refused(file, message):
    with pytest.raises(InvalidRequestError, match=re.escape(message)):
        ChatCompletionRequest.from_openai(file_body(file))


def test_server_answers_a_file_part(tiny):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from mistral_ref.server import create_app
    data = base64.b64encode(SALES.encode()).decode()
    with TestClient(create_app(tiny)) as client:
        ok = client.post("/v1/chat/completions", json=file_body(
            {"filename": "sales.csv", "file_data": f"data:text/csv;base64,{data}"}, QUESTION[0]["content"]))
        assert ok.status_code == 200, ok.text
        no_files = client.post("/v1/chat/completions", json={**file_body({}), "messages": QUESTION})
        assert ok.json()["usage"]["prompt_tokens"] > no_files.json()["usage"]["prompt_tokens"] + 20
        bad = client.post("/v1/chat/completions", json=file_body({"file_id": "file-x"}))
        assert bad.status_code == 400 and "file-x" in bad.json()["error"]["message"]
