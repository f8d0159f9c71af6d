"""Numba's on-disk cache after an edit to an inlined helper in another file: stock Numba serves the
stale kernel; a package under kernels.jit_cache recompiles it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mistral_ref_kernels import jit_cache

KERNEL = """\
import numba
from .helper import bump

@numba.njit(cache=True)
def kernel(x):
    return bump(x)
"""
HELPER = """\
import numba

@numba.njit(inline="always", cache=True)
def bump(x):
    return x + {step}
"""


def make_package(root: Path, watched: bool) -> None:
    """A package whose kernel inlines a helper from another file; `watched`: its __init__
    installs kernels.jit_cache for itself, as mistral_ref_kernels does."""
    root.mkdir()
    init = "from pathlib import Path\nfrom mistral_ref_kernels import jit_cache\n" \
           "jit_cache.install(Path(__file__).parent)\n" if watched else ""
    (root / "__init__.py").write_text(init)
    (root / "kernel.py").write_text(KERNEL)
    (root / "helper.py").write_text(HELPER.format(step=1))


def run_kernel(package: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}  # the in-tree cache
    code = f"from {package.name}.kernel import kernel; print(kernel(1), kernel.stats.cache_hits.total())"
    return subprocess.run([sys.executable, "-c", code], cwd=package.parent, env=env, check=True,
                          capture_output=True, text=True).stdout.split()


@pytest.mark.parametrize("watched", [False, True], ids=["stock numba", "jit_cache"])
def test_editing_an_inlined_helper(tmp_path, watched):
    package = tmp_path / ("watched" if watched else "stock")
    make_package(package, watched)
    assert run_kernel(package) == ["2", "0"]  # compiled, stored
    assert run_kernel(package) == ["2", "1"]  # loaded from the cache
    (package / "helper.py").write_text(HELPER.format(step=10))
    if watched:
        assert run_kernel(package) == ["11", "0"]  # recompiled
        assert run_kernel(package) == ["11", "1"]
    else:
        assert run_kernel(package) == ["2", "1"]  # the stale kernel: why jit_cache exists


def test_stamp_covers_every_source_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "sub" / "b.py").write_text("y = 2\n")
    before = jit_cache.source_stamp.__wrapped__(tmp_path)
    (tmp_path / "sub" / "b.py").write_text("y = 3\n")
    assert jit_cache.source_stamp.__wrapped__(tmp_path) != before


def test_our_kernels_use_it():
    from mistral_ref_kernels.cpu import dequant
    assert type(dequant.q4_k._cache._impl.locator).__module__ == jit_cache.__name__


FORWARD_AND_COUNT_MISSES = """\
import gc, sys
import numba
from mistral_ref.model import Model
model = Model.from_gguf(sys.argv[1], activations="q8")
model.forward([1, 2, 3], model.new_cache(8))  # prefill (T = 3) and then decode (T = 1)
model.forward([4], model.new_cache(8))
misses = sorted(d.py_func.__qualname__ for d in gc.get_objects()
                if isinstance(d, numba.core.dispatcher.Dispatcher) and d.stats.cache_misses)
print(" ".join(misses) or "none")
"""


def test_a_new_process_compiles_nothing(default_model):
    """Every kernel a q8 forward pass calls is loaded from the cache by the next process: a
    compiled function that Numba saves but can never find again (a closure calling other compiled
    closures) cost each new process ~1.3 s before its first token."""
    run = lambda: subprocess.run([sys.executable, "-c", FORWARD_AND_COUNT_MISSES, str(default_model)],  # noqa: E731
                                 capture_output=True, text=True, timeout=600, check=True).stdout.split()[-1]
    run()  # fills the cache where this checkout's kernels are not compiled yet
    assert run() == "none"
