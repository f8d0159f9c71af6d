"""Chat messages as mistral.rs's Python API spells them: `Message(Role.User, "Hello")`."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from mistral_ref.errors import ChatTemplateError


class Role(str, Enum):
    """Who wrote a message; the value is the role string chat templates see."""

    System = "system"
    User = "user"
    Assistant = "assistant"
    Tool = "tool"


@dataclass(frozen=True)
class Message:
    """One chat turn. `role` may also be given as its string ("user")."""

    role: Role
    content: str

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "role", Role(self.role))
        except ValueError:
            raise ChatTemplateError(f"unknown message role {self.role!r} (known: "
                                    f"{', '.join(r.value for r in Role)})") from None
        if not isinstance(self.content, str):
            raise ChatTemplateError(f"message content must be a str, got {type(self.content).__name__}")

    def to_dict(self) -> dict[str, str]:
        """The OpenAI/HF form, {"role": "user", "content": "..."}."""
        return {"role": self.role.value, "content": self.content}
