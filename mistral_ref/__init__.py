"""mistral-ref: a readable, fast reference implementation of Mistral-family LLM inference."""
from mistral_ref.chat_template import MISTRAL_INSTRUCT_TEMPLATE, apply_chat_template, render_chat_template
from mistral_ref.errors import ChatTemplateError, MistralRefError, TokenizerError
from mistral_ref.gguf import Config, GGUFFile, QuantizedTensor, load_gguf
from mistral_ref.messages import Message, Role
from mistral_ref.tokenizer import IncrementalDetokenizer, Tokenizer, sentencepiece_gguf_metadata

__all__ = [
    "MISTRAL_INSTRUCT_TEMPLATE", "ChatTemplateError", "Config", "GGUFFile", "IncrementalDetokenizer",
    "Message", "MistralRefError", "QuantizedTensor", "Role", "Tokenizer", "TokenizerError",
    "apply_chat_template", "load_gguf", "render_chat_template", "sentencepiece_gguf_metadata",
]
