"""Where weights live in memory: the file's page-cache map, or an anonymous copy on huge pages.

A memory map reads the weights through the page cache in 4 KB pages: nothing is copied and the
process's resident size stays the file's, but every 4 KB of weights needs its own TLB entry.
A copy in anonymous memory advised `MADV_HUGEPAGE` sits on 2 MB pages (transparent huge pages,
when the kernel allows them), as llama.cpp's `--no-mmap` does: loading reads the whole file, and
decode, which streams every weight once per token, misses the TLB 512x less often.
"""
from __future__ import annotations

import mmap
import os

import numpy as np

HUGE_PAGE = 2 << 20  # bytes: x86-64's transparent huge page


def huge_page_array(nbytes: int) -> np.ndarray:
    """A zeroed uint8 (nbytes,) array in anonymous memory, starting on a 2 MB boundary, advised
    MADV_HUGEPAGE (a hint: where transparent huge pages are off it is ordinary memory). The
    mapping lives as long as the array or any view of it."""
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        region.madvise(mmap.MADV_HUGEPAGE)
    whole = np.frombuffer(region, dtype=np.uint8)
    skip = -whole.ctypes.data % HUGE_PAGE
    return whole[skip:skip + nbytes]


def read_into_huge_pages(path: str | os.PathLike, start: int, nbytes: int) -> np.ndarray:
    """Bytes start..start + nbytes of a file, copied into a huge_page_array (uint8 (nbytes,))."""
    out = huge_page_array(nbytes)
    view = memoryview(out)
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        done = 0
        while done < nbytes:
            n = f.readinto(view[done:done + (256 << 20)])
            if not n:
                raise EOFError(f"{path}: ends {nbytes - done} bytes early")
            done += n
    out.flags.writeable = False
    return out
