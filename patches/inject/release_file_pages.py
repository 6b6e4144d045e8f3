"""Give back the pages of a checkpoint file once a tensor read from it has been copied.

transformers reads safetensors checkpoints through `safe_open`, which maps each file into
memory once (safetensors 0.8: one private mapping per file, each tensor a view into it) and
keeps the mapping until the whole load ends. Every page a tensor's bytes were read from stays
resident and counts in the process's RSS (RssFile) until then: loading 26B-A4B onto a GPU
raised the host's VmHWM by 47 GiB (BF16 checkpoint) and 13 GiB (4-bit checkpoint) although
its anonymous memory stayed under 0.14 GiB. Once the loader has copied a tensor elsewhere
(to the GPU, or to another dtype) the pages are not needed any more: `madvise(MADV_DONTNEED)`
drops them from this process's RSS. They stay in the page cache, and a clean page of a file
mapping reads back from the file if anything touches it again, so the view keeps its values.

Only what is certainly safe is released:
- whole pages strictly inside the tensor's bytes (start rounded up, end rounded down): a page
  shared with a neighbouring tensor, which the model may keep as its parameter, is never
  dropped;
- only inside a mapping of a named file (from /proc/self/maps): MADV_DONTNEED on anonymous
  memory would zero it;
- only when the copy does not share the source's memory (a `.to()` that changed nothing
  returns the view itself, which the model then keeps);
- only for tensors the loader itself read from a file (a safetensors slice): a tensor of a
  state dict the caller passed stays the caller's, whatever memory it lives in (an in-place
  change to a private file mapping lives in its page, which MADV_DONTNEED would drop).

P19 inserts this module at the end of transformers/core_model_loading.py and calls
`stackpatch_materialize_releasing` at the top of `_materialize_copy`. On other systems than
Linux nothing is released.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import sys
from collections.abc import Callable, Iterable

import torch

STACKPATCH_MADV_DONTNEED = 4  # <sys/mman.h> on Linux, every architecture


def stackpatch_page_interior(start: int, nbytes: int, page: int = mmap.PAGESIZE) -> range:
    """The whole pages inside [start, start + nbytes), as a range of addresses (maybe empty)."""
    first = -(-start // page) * page
    end = (start + nbytes) // page * page
    return range(first, max(first, end))


def stackpatch_mapped_file(lines: Iterable[str], first: int, end: int) -> str | None:
    """The file whose mapping (a line of /proc/self/maps) holds [first, end), or None when that
    memory is anonymous, a special mapping or spans several mappings."""
    for line in lines:
        fields = line.split(maxsplit=5)
        low, high = (int(bound, 16) for bound in fields[0].split("-"))
        if not low <= first < high:
            continue
        path = fields[5].strip() if len(fields) == 6 else ""
        named = path.startswith("/") and not path.startswith(("/dev/", "/memfd:"))
        on_disk = fields[4] != "0" and not path.endswith("(deleted)")  # an inode to read back
        return path if end <= high and named and on_disk else None
    return None


@functools.cache
def _stackpatch_libc_madvise() -> Callable[..., int]:
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return madvise


def _stackpatch_madvise(first: int, length: int) -> bool:
    return _stackpatch_libc_madvise()(first, length, STACKPATCH_MADV_DONTNEED) == 0


def _stackpatch_storage_span(tensor: torch.Tensor) -> range:
    storage = tensor.untyped_storage()
    return range(storage.data_ptr(), storage.data_ptr() + storage.nbytes())


def stackpatch_release_file_pages(source: torch.Tensor, copy: torch.Tensor) -> int:
    """Drop the file pages strictly inside `source`'s bytes from this process's RSS, once
    `copy` holds its values in other memory; returns how many bytes were released."""
    if not sys.platform.startswith("linux") or source.device.type != "cpu":
        return 0
    if not source.is_contiguous() or copy is source:
        return 0
    pages = stackpatch_page_interior(source.data_ptr(), source.numel() * source.element_size())
    if not pages:
        return 0
    if copy.device.type == "cpu":
        span = _stackpatch_storage_span(copy)
        if span.start < pages.stop and pages.start < span.stop:
            return 0  # the copy shares these bytes: they are what the model keeps
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
        if stackpatch_mapped_file(maps, pages.start, pages.stop) is None:
            return 0
    return len(pages) if _stackpatch_madvise(pages.start, len(pages)) else 0


def stackpatch_materialize_releasing(
    source: object, materialize: Callable[..., torch.Tensor], device=None, dtype=None
) -> torch.Tensor:
    """transformers' `materialize(tensor, device, dtype)` of a slice of a checkpoint file, then
    the file pages it was read from released if the result is a copy."""
    view = source[...]  # type: ignore[index]  # a safetensors slice: a view into the mapping
    result = materialize(view, device, dtype)
    stackpatch_release_file_pages(view, result)
    return result
