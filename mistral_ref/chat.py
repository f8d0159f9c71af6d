"""`mistral-ref chat`: an interactive terminal chat, as mistral.rs's interactive mode.

Each line you type is a user turn; the reply streams as it is generated and joins the history, so
the next turn sees the whole conversation (the prefix cache reuses its keys and values). Commands:
`/reset` forgets the conversation, `/system TEXT` starts a new one with that system prompt,
`/exit` (or end of input, Ctrl-D) quits, `/help` lists them. Ctrl-C stops a reply and keeps what
was shown of it; the program goes on.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TextIO

from mistral_ref.api_types import ChatCompletionRequest
from mistral_ref.errors import MistralRefError
from mistral_ref.runner import Runner

HELP = ("/reset: forget the conversation; /system TEXT: new conversation with this system prompt; "
        "/exit or Ctrl-D: quit; Ctrl-C: stop the reply")


def chat_loop(runner: Runner, read_line: Callable[[str], str], out: TextIO, system: str | None = None,
              max_tokens: int | None = None, temperature: float | None = None) -> list[dict[str, str]]:
    """Run the conversation until /exit or end of input (read_line raises EOFError); returns the
    history as OpenAI-style message dicts. read_line(prompt) -> the user's line (`input`)."""
    history = _start(system)
    while True:
        try:
            line = read_line("> ").strip()
        except EOFError:
            out.write("\n")
            return history
        except KeyboardInterrupt:  # at the prompt: a fresh line, as a shell does
            out.write("\n")
            continue
        command, _, rest = line.partition(" ")
        if not line:
            continue
        if command in ("/exit", "/quit"):
            return history
        if command == "/help":
            out.write(HELP + "\n")
        elif command == "/reset":
            history = _start(system)
        elif command == "/system":
            system = rest.strip() or None
            history = _start(system)
        else:
            history.append({"role": "user", "content": line})
            history.append({"role": "assistant", "content": _reply(runner, history, out, max_tokens,
                                                                   temperature)})


def _start(system: str | None) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}] if system else []


def _reply(runner: Runner, history: list[dict[str, str]], out: TextIO, max_tokens: int | None,
           temperature: float | None) -> str:
    """Stream one reply to `out`; returns its text (what was shown, if Ctrl-C stopped it)."""
    shown: list[str] = []
    request = ChatCompletionRequest(messages=list(history), max_tokens=max_tokens,
                                    temperature=temperature, stream=True)
    chunks = None
    try:
        chunks = runner.send_chat_completion_request(request)
        for chunk in chunks:
            text = chunk.choices[0].delta.content
            out.write(text)
            out.flush()
            shown.append(text)
    except KeyboardInterrupt:
        out.write(" [stopped]")
    except MistralRefError as e:  # e.g. the conversation outgrew the context: say so, go on
        out.write(f"[error: {e}]")
    finally:
        if chunks is not None:
            chunks.close()  # cancels the generation if it was stopped
    out.write("\n")
    return "".join(shown)
