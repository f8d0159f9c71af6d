"""Numba's on-disk cache, kept correct across edits to any kernel file.

Numba keys a cached function on its own source file only. Our kernels inline helpers, intrinsics
and per-format functions from other files (kernels.cpu.lanes, kernels.formats, ...), so after an
edit to one of those a kernel in another file would load its stale machine code from the cache.
`install(root)` makes Numba (and numba-cuda) stamp the cache of every function defined under
`root` with a hash of all the Python sources under `root` instead: an edit anywhere in the package
recompiles every kernel once, and nothing else changes (the cache stays where Numba keeps it:
NUMBA_CACHE_DIR, else __pycache__ beside the source, else the user's cache directory).
"""
from __future__ import annotations

import hashlib
import warnings
from functools import cache
from pathlib import Path


@cache
def source_stamp(root: Path) -> str:
    """SHA-256 over the path and bytes of every .py file under `root`, in a fixed order."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _package_locator(base: type, root: Path) -> type:
    """A subclass of Numba's cache locator `base` that takes only functions under `root` and
    stamps them with the package's stamp."""
    class PackageLocator(base):
        def get_source_stamp(self):
            return source_stamp(root)

        @classmethod
        def from_function(cls, py_func, py_file):
            if not Path(py_file).resolve().is_relative_to(root):
                return None
            return super().from_function(py_func, py_file)

    PackageLocator.__name__ = PackageLocator.__qualname__ = f"Package{base.__name__}"
    return PackageLocator


def _install_in(cache_impl: type, bases: tuple[type, ...], root: Path) -> None:
    """Put package locators for `bases` first in `cache_impl`'s list (once per root)."""
    if any(getattr(c, "root", None) == root for c in cache_impl._locator_classes):
        return
    locators = [_package_locator(base, root) for base in bases]
    for locator in locators:
        locator.root = root
    cache_impl._locator_classes = locators + list(cache_impl._locator_classes)


def install(root: str | Path) -> None:
    """Stamp the Numba cache of every function defined under `root` with `source_stamp(root)`.
    Call it before the functions are decorated. Covers numba-cuda's cache too when numba.cuda
    has been imported."""
    import sys

    from numba.core import caching

    root = Path(root).resolve()
    _install_in(caching.CacheImpl, (caching.UserProvidedCacheLocator,
                                    caching.InTreeCacheLocator,
                                    caching.UserWideCacheLocator), root)
    if "numba.cuda" in sys.modules:
        try:
            from numba.cuda.core import caching as cuda_caching
            bases = (cuda_caching._UserProvidedCacheLocator, cuda_caching._InTreeCacheLocator,
                     cuda_caching._UserWideCacheLocator)  # private names: they may move
        except (ImportError, AttributeError) as e:
            warnings.warn(f"numba-cuda's kernel cache is not stamped with the package source "
                          f"(edit a helper, then delete kernels/cuda/__pycache__): {e}")
            return
        _install_in(cuda_caching.CacheImpl, bases, root)
