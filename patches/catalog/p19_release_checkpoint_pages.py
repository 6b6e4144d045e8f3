"""P19: from_pretrained keeps every page of the checkpoint it has read resident until the end."""

from __future__ import annotations

from pathlib import Path

import libcst as cst
import libcst.matchers as m

from patches.model import Patch, Status, Target
from patches.transform import PatchTransform

SOURCE = Path(__file__).resolve().parent.parent / "inject" / "release_file_pages.py"

# `def _materialize_copy(tensor, device=None, dtype=None)`: the names the call passes on.
_MATERIALIZE_COPY = m.FunctionDef(
    name=m.Name("_materialize_copy"),
    params=m.Parameters(
        params=[m.Param(m.Name("tensor")), m.Param(m.Name("device")), m.Param(m.Name("dtype"))]
    ),
)
_DOCSTRING = m.SimpleStatementLine(body=[m.Expr(m.SimpleString() | m.ConcatenatedString())])
# A slice of a file the loader opened (a state dict's tensors are the caller's: left alone).
_RELEASING = (
    "if not isinstance(tensor, torch.Tensor):\n"
    "    return stackpatch_materialize_releasing(tensor, _materialize_copy, device, dtype)\n"
)


class ReleaseCheckpointPages(PatchTransform):
    DESCRIPTION = (
        "Once _materialize_copy has copied a tensor read from a checkpoint file to its device "
        "or dtype, drop the file pages it was read from out of the process's RSS."
    )
    SCOPE = ("_materialize_copy",)
    SITES = 2

    def leave_scope(  # type: ignore[override]
        self, original_node: cst.FunctionDef, updated_node: cst.FunctionDef
    ) -> cst.FunctionDef:
        if self.carries_marker(original_node) or not m.matches(original_node, _MATERIALIZE_COPY):
            return updated_node
        self.count_rewrite()
        body = list(cst.ensure_type(updated_node.body, cst.IndentedBlock).body)
        at = 1 if body and m.matches(body[0], _DOCSTRING) else 0  # a docstring stays first
        body.insert(at, self.marked_statement(_RELEASING))
        return updated_node.with_changes(body=updated_node.body.with_changes(body=body))

    def leave_Module(self, original_node: cst.Module, updated_node: cst.Module) -> cst.Module:
        return self.with_injected(updated_node, SOURCE)


PATCH = Patch(
    id="P19",
    slug="release-checkpoint-pages",
    title="from_pretrained gives back each checkpoint tensor's file pages once it is copied",
    package="transformers",
    affected=">=5.5.0",
    status=Status.UPSTREAMABLE,
    targets=(Target("transformers/core_model_loading.py", ReleaseCheckpointPages),),
    rationale=(
        "transformers opens every safetensors shard with safe_open, which maps the whole file "
        "into memory (safetensors 0.8: one private mapping per file, each tensor a view into "
        "it), and closes the files only when loading ends. _materialize_copy reads a tensor "
        "through its slice and copies it to its device and dtype; the pages it was read from "
        "stay mapped and count in the process's resident memory (RssFile) until then. Loading "
        "26B-A4B onto a GPU raised the host's VmHWM by 47.2 GiB from the BF16 checkpoint and "
        "by 13.2 GiB from its 4-bit one (P13) while anonymous memory stayed under 0.14 GiB "
        "(bench/results/quantized_checkpoint.md): a host or container limit that counts RSS "
        "sees the whole checkpoint. The patch has _materialize_copy, after the copy, call "
        "madvise(MADV_DONTNEED) on the whole pages inside the tensor's bytes, only when they "
        "lie in a mapping of a named file (/proc/self/maps; never anonymous memory, which it "
        "would zero), only when the result does not share them (a .to() that changed nothing "
        "returns the view, which the model keeps), and only for slices of files the loader "
        "opened itself (a state dict's tensors stay the caller's). The pages stay in the page "
        "cache and read back from the file if touched again, so no value changes. Pages "
        "shared with a neighbouring tensor are kept. Linux only; elsewhere nothing changes."
    ),
    references=(
        "bench/results/quantized_checkpoint.md: VmHWM 47.2 / 13.2 GiB above the interpreter's, "
        "anonymous memory under 0.14 GiB",
        "https://github.com/huggingface/transformers/blob/v5.23.0/src/transformers/core_model_loading.py",
    ),
    reproducer="validation/p19_checkpoint_pages_stay_resident.py",
)
