"""`mistral-ref chat`: the conversation loop against the Runner's own replies."""
from __future__ import annotations

import io
import subprocess
import sys

import pytest

from mistral_ref.api_types import ChatCompletionRequest
from mistral_ref.chat import chat_loop
from mistral_ref.runner import Runner, Which
from mistral_ref.synth import synth_model


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "tiny.gguf"
    synth_model(path, "tiny", "Q4_K_M", seed=0, progress=False)
    return path


@pytest.fixture(scope="module")
def tiny(tiny_path) -> Runner:
    return Runner(Which.GGUF(str(tiny_path)))


def lines(*typed: str):
    """read_line for chat_loop: the typed lines, then end of input."""
    queue = list(typed)

    def read_line(prompt: str) -> str:
        if not queue:
            raise EOFError
        line = queue.pop(0)
        if isinstance(line, BaseException):
            raise line
        return line
    return read_line


def reply(runner: Runner, messages: list[dict]) -> str:
    request = ChatCompletionRequest(messages=messages, max_tokens=6, temperature=0)
    return runner.send_chat_completion_request(request).choices[0].message.content


def test_history_reset_and_system(tiny):
    out = io.StringIO()
    history = chat_loop(tiny, lines("Hello", "", "And then?", "/reset", "/system Be brief.", "Hi",
                                    KeyboardInterrupt(), "/help", "/exit", "never read"),
                        out, max_tokens=6, temperature=0)
    first = reply(tiny, [{"role": "user", "content": "Hello"}])
    second = reply(tiny, [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": first},
                          {"role": "user", "content": "And then?"}])
    brief = reply(tiny, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert history == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                       {"role": "assistant", "content": brief}]
    text = out.getvalue()
    assert text.index(first) < text.index(second) < text.index(brief) and "/reset" in text


class StopAfter(io.StringIO):
    """An output whose n-th write raises KeyboardInterrupt, as Ctrl-C during a reply."""

    def __init__(self, n: int):
        super().__init__()
        self.writes = 0
        self.n = n

    def write(self, text: str) -> int:
        self.writes += 1
        if self.writes == self.n:
            raise KeyboardInterrupt
        return super().write(text)


def test_ctrl_c_stops_the_reply_not_the_program(tiny):
    out = StopAfter(3)  # the prompt's "> " is not written by chat_loop: writes are reply pieces
    history = chat_loop(tiny, lines("Hello", "Hello again"), out, max_tokens=6, temperature=0)
    assert "[stopped]" in out.getvalue()
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    full = reply(tiny, [{"role": "user", "content": "Hello"}])
    assert full.startswith(history[1]["content"]) and len(history[1]["content"]) < len(full)


def test_cli_chat_end_to_end(tiny_path):
    done = subprocess.run([sys.executable, "-m", "mistral_ref.cli", "chat", "--model", str(tiny_path),
                           "--max-tokens", "4", "--temperature", "0"],
                          input="Hello\n/exit\n", capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "/reset" in done.stdout and len(done.stdout.splitlines()) >= 2
