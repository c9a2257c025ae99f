"""PI-resize: one underlying patch embedding / de-embedding, linearly projected to any patch size.

FlexiDiT (arXiv 2502.20126, §3.1 and App. C.2) keeps one kernel at an underlying patch size p' and maps it
to a patch size p with the pseudo-inverse of the resize matrix (FlexiViT's PI-resize, which preserves
token norms better than plain resizing). Patches are per-axis sizes, (p, p) for images and (pt, ph, pw)
for videos; a resize matrix is the Kronecker product of 1-D linear resizes, one per axis. For square 2-D
patches this is torch's bilinear resize, for the temporal axis of a (1, 2, 2) -> (2, 2, 2) video it
duplicates and halves the native embed kernel in time (weak token = native token of the frame-averaged
patch) and duplicates the de-embed weights unscaled (both frames get the native output).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def linear_resize_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """R (size_out, size_in) float64: 1-D linear resize (torch, align_corners=False) of a length-size_in axis."""
    basis = torch.eye(size_in, dtype=torch.float64)[:, None, :]  # (in, 1, in)
    return F.interpolate(basis, size=size_out, mode="linear", align_corners=False)[:, 0].T  # (out, in)


def resize_matrix(size_in: Sequence[int], size_out: Sequence[int]) -> torch.Tensor:
    """B (prod(size_out), prod(size_in)): separable (bi/tri)linear resize of a row-major flattened patch."""
    matrix = torch.ones(1, 1, dtype=torch.float64)
    for a, b in zip(size_in, size_out, strict=True):
        r = linear_resize_matrix(a, b)  # (b, a)
        # Kronecker product, first axis slowest as in the flatten; written out because torch.kron fails
        # on the size-1 axes of a 1-frame patch (non-standard strides).
        matrix = (matrix[:, None, :, None] * r[None, :, None, :]).reshape(matrix.shape[0] * b, matrix.shape[1] * a)
    return matrix


def embed_projection(patch: Sequence[int], underlying: Sequence[int]) -> torch.Tensor:
    """Q_embed(p) = pinv(B_{p'->p}ᵀ), (prod p, prod p'): underlying kernel slice -> kernel slice at p."""
    return torch.linalg.pinv(resize_matrix(underlying, patch).T)


def deembed_projection(patch: Sequence[int], underlying: Sequence[int]) -> torch.Tensor:
    """Q_de(p) = pinv(B_{p->p'}ᵀ), (prod p', prod p), applied per output channel of the final linear."""
    return torch.linalg.pinv(resize_matrix(patch, underlying).T)


def project_kernel(weight: torch.Tensor, q: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Conv kernel (D, C, *a) -> (D, C, *size) with q (prod size, prod a) applied to every kernel slice."""
    d, c = weight.shape[:2]
    out = torch.einsum("ij,ocj->oci", q, weight.reshape(d, c, -1))  # (D, C, prod size)
    return out.reshape(d, c, *size)


def project_head(weight: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Final-linear weight (a·C, D) or bias (a·C,) -> (b·C, ...) with q (a, b) per channel, a = prod p'.

    The output index is (patch cell, channel) with the channel fastest (DiT's (p_row, p_col, channel);
    the video DiT's (pt, ph, pw, channel)), so the leading dim splits as (a, C).
    """
    rest = weight.shape[1:]
    out = torch.einsum("ab,ac...->bc...", q, weight.reshape(q.shape[0], -1, *rest))  # (b, C, ...)
    return out.reshape(-1, *rest)


class PIResized(nn.Module):
    """Underlying weight/bias at patch p', PI-resized to every patch of ``patch_dims`` (shared mode).

    ``patch_dims`` maps the model's patch sizes (ints or tuples) to their per-axis sizes. Projections are
    recomputed while autograd records (training needs the graph anyway, and the einsum costs ~1e-4 of a
    forward) and cached otherwise (sampling), keyed on the parameters' version counters and storage:
    optimizer steps, EMA lerps and ``load_state_dict`` all bump the version, so a stale projection is
    never served. In-place edits through ``.data`` bypass the counter; call :meth:`clear_cache` after those.
    """

    def __init__(
        self,
        kind: str,
        weight: torch.Tensor,
        bias: torch.Tensor,
        underlying: Sequence[int],
        patch_dims: Mapping[Hashable, Sequence[int]],
    ):
        super().__init__()
        self.kind = kind  # "embed": conv kernel (D, C_in, *p'); "head": linear (prod p'·C_out, D)
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)
        # Plain dicts, not buffers: kept out of the state dict and of DDP's buffer broadcast.
        project = embed_projection if kind == "embed" else deembed_projection
        self._dims = {p: tuple(dims) for p, dims in patch_dims.items()}
        self._fp64 = {p: project(dims, underlying) for p, dims in self._dims.items()}  # float64 on CPU
        self._matrices: dict = {}  # (p, device, dtype) -> projection matrix
        self._resized: dict = {}  # p -> (parameter state, weight, bias)

    def clear_cache(self) -> None:
        self._resized.clear()

    def matrix(self, patch_size: Hashable) -> torch.Tensor:
        """Projection matrix in the compute dtype (at least fp32: bf16 would round the pinv entries)."""
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        if torch.compiler.is_compiling():
            return self._fp64[patch_size].to(self.weight.device, dtype)
        key = (patch_size, self.weight.device, dtype)
        if key not in self._matrices:
            self._matrices[key] = self._fp64[patch_size].to(self.weight.device, dtype)
        return self._matrices[key]

    def resize(self, patch_size: Hashable) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) at ``patch_size``, differentiable w.r.t. the underlying parameters.

        Always computed in (at least) fp32, also under bf16 autocast: autocast would run the projection
        einsum in bf16 and round the PI-resized kernels; the conv / linear that use them still autocast.
        """
        q = self.matrix(patch_size)
        with torch.autocast(self.weight.device.type, enabled=False):
            if self.kind == "embed":
                weight = project_kernel(self.weight.to(q.dtype), q, self._dims[patch_size])  # (D, C_in, *p)
                return weight.to(self.weight.dtype), self.bias
            weight = project_head(self.weight.to(q.dtype), q)  # (prod p·C_out, D)
            bias = project_head(self.bias.to(q.dtype), q)  # (prod p·C_out,)
        return weight.to(self.weight.dtype), bias.to(self.bias.dtype)

    def forward(self, patch_size: Hashable) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self.resize(patch_size)
        w, b = self.weight, self.bias
        state = (w._version, b._version, w.data_ptr(), b.data_ptr(), w.device, w.dtype)
        hit = self._resized.get(patch_size)
        if hit is None or hit[0] != state:
            hit = (state, *self.resize(patch_size))
            self._resized[patch_size] = hit
        return hit[1], hit[2]
