"""mistral-ref: a readable, fast reference implementation of Mistral-family LLM inference."""
from mistral_ref.api_types import ChatCompletionRequest, CompletionRequest, ToolChoice, WebSearchOptions
from mistral_ref.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from mistral_ref.chat_template import MISTRAL_INSTRUCT_TEMPLATE, apply_chat_template, render_chat_template
from mistral_ref.errors import (ChatTemplateError, GrammarError, InvalidRequestError, MistralRefError,
                                ModelSourceError, TokenizerError)
from mistral_ref.gguf import Config, GGUFFile, QuantizedTensor, load_gguf
from mistral_ref.imatrix import CalibrationStatus
from mistral_ref.input_files import InputFile
from mistral_ref.messages import Message, Role
from mistral_ref.model import KVCache, Model, generate
from mistral_ref.quantize import quantize_file
from mistral_ref.runner import PagedCacheType, Runner
from mistral_ref.synth import synth_model
from mistral_ref.tokenizer import IncrementalDetokenizer, Tokenizer, sentencepiece_gguf_metadata
from mistral_ref.which import (Architecture, DiffusionArchitecture, EmbeddingArchitecture,
                               IsqOrganization, ModelDType, MultimodalArchitecture,
                               TextAutoMapParams, Which)

__all__ = [
    "Architecture", "CalibrationStatus", "Checkpoint", "DiffusionArchitecture", "EmbeddingArchitecture",
    "IsqOrganization", "ModelDType", "MultimodalArchitecture", "PagedCacheType",
    "TextAutoMapParams", "ToolChoice", "WebSearchOptions", "load_checkpoint", "save_checkpoint",
    "MISTRAL_INSTRUCT_TEMPLATE", "ChatCompletionRequest", "ChatTemplateError", "CompletionRequest",
    "Config", "GrammarError", "InputFile", "InvalidRequestError", "ModelSourceError", "Runner", "Which", "GGUFFile", "IncrementalDetokenizer",
    "KVCache", "Message", "MistralRefError", "Model", "QuantizedTensor", "Role", "Tokenizer",
    "TokenizerError", "apply_chat_template", "generate", "load_gguf", "quantize_file",
    "render_chat_template", "sentencepiece_gguf_metadata", "synth_model",
]
