"""mistral-ref: a readable, fast reference implementation of Mistral-family LLM inference."""
from mistral_ref.errors import MistralRefError
from mistral_ref.gguf import Config, GGUFFile, QuantizedTensor, load_gguf

__all__ = ["Config", "GGUFFile", "MistralRefError", "QuantizedTensor", "load_gguf"]
