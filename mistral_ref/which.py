"""Which model to load, spelled as mistral.rs's `Which`, `Architecture` and friends.

Every variant names local files: mistral-ref never downloads from a model hub, so a hub id that is
not a local path fails with ModelSourceError. `Which.GGUF` / `MistralGGUF` / `LlamaGGUF` name a
GGUF file; `Which.Plain` a Hugging Face checkpoint directory (mistral_ref.checkpoint). Variants
for models this engine does not run (LoRA, X-LoRA, multimodal, embedding, diffusion, speech)
exist so that scripts import, and fail at `Runner(...)` with an error that says so.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from mistral_ref.errors import ModelSourceError


class Architecture(Enum):
    """mistral.rs's text architectures (`Which.Plain(arch=...)`). This engine runs the llama
    family: Mistral, Llama, Qwen3 and SmolLm3 (one transformer: Mistral adds the sliding window,
    Qwen3 per-head q/k norms, SmolLM3 layers without RoPE); the others are refused by name."""

    Mistral = "mistral"
    Gemma = "gemma"
    Mixtral = "mixtral"
    Llama = "llama"
    Phi2 = "phi2"
    Phi3 = "phi3"
    Qwen2 = "qwen2"
    Gemma2 = "gemma2"
    Starcoder2 = "starcoder2"
    Phi3_5MoE = "phi3.5moe"
    DeepseekV2 = "deepseekv2"
    DeepseekV3 = "deepseekv3"
    Qwen3 = "qwen3"
    GLM4 = "glm4"
    GLM4Moe = "glm4moe"
    GLM4MoeLite = "glm4moelite"
    Qwen3Moe = "qwen3moe"
    SmolLm3 = "smollm3"
    GraniteMoeHybrid = "granitemoehybrid"
    GptOss = "gptoss"
    Qwen3Next = "qwen3next"
    Lfm2 = "lfm2"
    Lfm2Moe = "lfm2_moe"


# the architectures this engine runs -> the config.json model_types each loads
RUNS = {Architecture.Mistral: ("mistral", "llama"), Architecture.Llama: ("llama", "mistral"),
        Architecture.Qwen3: ("qwen3",), Architecture.SmolLm3: ("smollm3",)}


class MultimodalArchitecture(Enum):
    """mistral.rs's vision/audio architectures: none runs here (Which.MultimodalPlain is refused)."""

    Phi3V = "phi3v"
    Idefics2 = "idefics2"
    LLaVANext = "llava-next"
    LLaVA = "llava"
    Lfm2Vl = "lfm2vl"
    VLlama = "vllama"
    Qwen2VL = "qwen2vl"
    Idefics3 = "idefics3"
    MiniCpmO = "minicpmo"
    Phi4MM = "phi4mm"
    Qwen2_5VL = "qwen2_5vl"
    Gemma3 = "gemma3"
    Mistral3 = "mistral3"
    Llama4 = "llama4"
    Gemma3n = "Gemma3n"
    Qwen3VL = "Qwen3VL"
    Qwen3 = "qwen3"
    Qwen3Moe = "qwen3moe"
    Qwen3_5 = "Qwen3_5"
    Qwen3_5Moe = "Qwen3_5Moe"
    Gemma4 = "Gemma4"
    Voxtral = "Voxtral"


class EmbeddingArchitecture(Enum):
    EmbeddingGemma = "embeddinggemma"
    Qwen3Embedding = "qwen3embedding"


class DiffusionArchitecture(Enum):
    Flux = "flux"
    FluxOffloaded = "flux-offloaded"


class ModelDType(Enum):
    """The dtype weights are held in. Auto: as stored (F32, F16 and BF16 checkpoints stay views of
    their files); a float dtype other than the stored one is refused (use in_situ_quant)."""

    Auto = "auto"
    BF16 = "bf16"
    F16 = "f16"
    F32 = "f32"


class IsqOrganization(Enum):
    """Which weights in_situ_quant quantizes. MoQE quantizes only MoE experts "if applicable"
    (mistral.rs): on the dense models this engine runs it is the same as Default."""

    Default = "default"
    MoQE = "moqe"


@dataclass
class TextAutoMapParams:
    """mistral.rs's automatic device-mapping hints. One device holds every layer here, so there is
    nothing to map; max_seq_len does not bound the context (the model's does)."""

    max_seq_len: int = 4096
    max_batch_size: int = 1


class Which:
    """Which model to load (mistralrs.Which); every path is local."""

    @dataclass(frozen=True)
    class GGUF:
        """A GGUF file: `quantized_model_id` is the file, or a directory holding
        `quantized_filename`; `tok_model_id` None (the GGUF's tokenizer) or a directory with a
        tokenizer.json; `tokenizer_json` a tokenizer.json replacing the GGUF's vocabulary;
        `topology` a topology file of per-layer ISQ types (mistral_ref.topology); `imatrix` an
        importance matrix file or `calibration_file` text to measure one on, for in_situ_quant
        (mistral_ref.imatrix)."""

        quantized_model_id: str
        quantized_filename: str | list[str] | None = None
        tok_model_id: str | None = None
        tokenizer_json: str | None = None
        repeat_last_n: int = 64
        topology: str | None = None
        dtype: ModelDType = ModelDType.Auto
        imatrix: str | None = field(default=None, kw_only=True)
        calibration_file: str | None = field(default=None, kw_only=True)

    @dataclass(frozen=True)
    class MistralGGUF:
        """The seed's spelling of a GGUF model (the same fields as GGUF)."""

        tok_model_id: str | None
        quantized_model_id: str
        quantized_filename: str | None = None
        tokenizer_json: str | None = None
        repeat_last_n: int = 64
        topology: str | None = None
        dtype: ModelDType = ModelDType.Auto

    class LlamaGGUF(MistralGGUF):
        """Same fields as MistralGGUF: both architectures load through one code path."""

    @dataclass(frozen=True)
    class Plain:
        """A Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer files).
        arch: Architecture.Mistral or .Llama (None: config.json's model_type decides);
        tokenizer_json: a tokenizer.json replacing the directory's; organization: see
        IsqOrganization; auto_map_params: accepted (TextAutoMapParams); topology: a mistral.rs
        topology file of per-layer ISQ types (mistral_ref.topology); imatrix / calibration_file:
        as Which.GGUF's. UQFF files and MatFormer slices are refused: the engine has none."""

        model_id: str
        arch: Architecture | None = None
        tokenizer_json: str | None = None
        topology: str | None = None
        organization: IsqOrganization | str | None = None
        write_uqff: str | None = None
        from_uqff: str | list[str] | None = None
        dtype: ModelDType = ModelDType.Auto
        imatrix: str | None = None
        calibration_file: str | None = None
        hf_cache_path: str | None = None
        matformer_config_path: str | None = None
        matformer_slice_name: str | None = None
        auto_map_params: TextAutoMapParams | None = None
        repeat_last_n: int = 64

    class _Refused:
        """A model kind this engine does not run: it takes any fields; Runner(...) says so."""

        kind = "this kind of model"

        def __init__(self, *args: Any, **kwargs: Any):
            self.args, self.kwargs = args, kwargs

    MultimodalPlain = type("MultimodalPlain", (_Refused,), {"kind": "multimodal (vision / audio) models"})
    Embedding = type("Embedding", (_Refused,), {"kind": "embedding models"})
    DiffusionPlain = type("DiffusionPlain", (_Refused,), {"kind": "diffusion (image generation) models"})
    Speech = type("Speech", (_Refused,), {"kind": "speech models"})
    Lora = type("Lora", (_Refused,), {"kind": "LoRA adapters"})
    XLora = type("XLora", (_Refused,), {"kind": "X-LoRA adapters"})
    LoraGGUF = type("LoraGGUF", (_Refused,), {"kind": "LoRA adapters"})
    XLoraGGUF = type("XLoraGGUF", (_Refused,), {"kind": "X-LoRA adapters"})
    GGML = type("GGML", (_Refused,), {"kind": "GGML (pre-GGUF) files"})


GGUF_VARIANTS = (Which.GGUF, Which.MistralGGUF)


def which_of_path(path: str | os.PathLike) -> Which.GGUF | Which.Plain:
    """The `Which` of a local model path: a checkpoint directory or a GGUF file (the CLI's MODEL)."""
    return Which.Plain(str(path)) if Path(path).is_dir() else Which.GGUF(str(path))


@dataclass(frozen=True)
class ModelFiles:
    """What a `Which` resolves to: a GGUF file or a checkpoint directory, and the tokenizer.json
    that replaces its vocabulary (None: its own)."""

    path: Path
    is_checkpoint: bool
    tokenizer_json: Path | None
    model_id: str
    topology: Path | None = None  # a topology file: per-layer ISQ types (mistral_ref.topology)
    imatrix: Path | None = None  # an importance matrix file for ISQ (mistral_ref.imatrix)
    calibration_file: Path | None = None  # text to measure one on


def _local(what: str, value: str | os.PathLike) -> Path:
    path = Path(value).expanduser()
    if not path.exists():
        raise ModelSourceError(
            f"{what} {str(value)!r} is not a local file or directory; mistral-ref loads local "
            "files only and never downloads from a model hub (see `mistral-ref fetch` for the "
            "default model, `mistral-ref export-hf` to write a checkpoint directory)")
    return path


def _topology(value: str | os.PathLike | None) -> Path | None:
    """A topology file's path (mistral_ref.topology.load_topology reads it and names a missing one)."""
    return None if value is None else Path(value).expanduser()


def _refuse(what: str, value: Any) -> None:
    if value is not None and value is not False:
        raise ModelSourceError(f"{what}={value!r} is not supported by mistral-ref (one CPU or CUDA "
                               "device; no UQFF or MatFormer files)")


def _importance(which: Any) -> dict[str, Path | None]:
    """ModelFiles' imatrix and calibration_file fields: local files, at most one of them."""
    imatrix, calibration_file = getattr(which, "imatrix", None), getattr(which, "calibration_file", None)
    if imatrix is not None and calibration_file is not None:
        raise ModelSourceError("imatrix and calibration_file are alternatives: give one")
    return {"imatrix": imatrix and _local("imatrix", imatrix),
            "calibration_file": calibration_file and _local("calibration_file", calibration_file)}


def resolve_which(which: Any) -> ModelFiles:
    """The files a `Which` names. Raises ModelSourceError naming the field."""
    if isinstance(which, Which._Refused):
        raise ModelSourceError(f"Which.{type(which).__name__}: {which.kind} are not supported by "
                               "mistral-ref (it runs Which.Plain, Which.GGUF, Which.MistralGGUF, "
                               "Which.LlamaGGUF text models)")
    if isinstance(which, Which.Plain):
        return _resolve_plain(which)
    if not isinstance(which, GGUF_VARIANTS):
        raise ModelSourceError(f"unsupported model selection {which!r} (supported: Which.Plain, "
                               "Which.GGUF, Which.MistralGGUF, Which.LlamaGGUF)")
    topology = _topology(which.topology)
    gguf = _local("quantized_model_id", which.quantized_model_id)
    filename = which.quantized_filename
    if isinstance(filename, list):
        if len(filename) != 1:
            raise ModelSourceError(f"quantized_filename lists {len(filename)} files; split GGUF files "
                                   "are not supported (merge them with llama-gguf-split --merge)")
        filename = filename[0]
    if gguf.is_dir():
        if not filename:
            raise ModelSourceError(f"quantized_filename is needed: {gguf} is a directory")
        gguf = _local("quantized_filename", gguf / filename)
    elif filename and Path(filename).name != gguf.name:
        raise ModelSourceError(f"quantized_model_id is the file {gguf}, but quantized_filename "
                               f"names {filename!r}")
    tokenizer_json = None
    if which.tokenizer_json is not None:
        tokenizer_json = _local("tokenizer_json", which.tokenizer_json)
    elif which.tok_model_id is not None:
        tok_dir = _local("tok_model_id", which.tok_model_id)
        tokenizer_json = _local("tok_model_id's tokenizer.json", tok_dir / "tokenizer.json")
    return ModelFiles(gguf, False, tokenizer_json, gguf.name, topology, **_importance(which))


def _resolve_plain(which: Which.Plain) -> ModelFiles:
    arch = which.arch
    if arch is not None and arch not in RUNS:
        name = arch.name if isinstance(arch, Architecture) else repr(arch)
        raise ModelSourceError(f"architecture {name} is not implemented by mistral-ref (it runs "
                               f"{', '.join('Architecture.' + a.name for a in RUNS)})")
    for what in ("write_uqff", "from_uqff", "matformer_config_path", "matformer_slice_name"):
        _refuse(what, getattr(which, what))
    if which.organization is not None:
        try:
            IsqOrganization(getattr(which.organization, "value", which.organization))
        except ValueError:
            raise ModelSourceError(f"organization {which.organization!r} is unknown (known: default, "
                                   "moqe)") from None
    path = _local("model_id", which.model_id)
    if not path.is_dir():
        raise ModelSourceError(f"model_id {which.model_id!r} is a file; Which.Plain takes a checkpoint "
                               "directory (a GGUF file is Which.GGUF)")
    if arch is not None:
        try:
            model_type = json.loads((path / "config.json").read_text()).get("model_type")
        except (OSError, ValueError, AttributeError):
            model_type = None  # the checkpoint loader names what is wrong with config.json
        if model_type is not None and model_type not in RUNS[arch]:
            raise ModelSourceError(f"arch=Architecture.{arch.name}, but {path / 'config.json'} is a "
                                   f"{model_type!r} model (Architecture.{arch.name} loads "
                                   f"{' or '.join(map(repr, RUNS[arch]))})")
    tokenizer_json = _local("tokenizer_json", which.tokenizer_json) if which.tokenizer_json else None
    return ModelFiles(path, True, tokenizer_json, str(which.model_id), _topology(which.topology),
                      **_importance(which))
