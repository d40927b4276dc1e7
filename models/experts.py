"""A bank of SwiGLU experts stored as stacked weights, applied with batched or grouped GEMMs.

Shape legend: E experts held here (local), C bucket rows, D model width, F expert hidden,
N rows sorted expert-major (expert e owns ``counts[e]`` consecutive rows).
On one rank the bank holds all experts; under expert parallelism ``turnout.parallel``
keeps only this rank's slice (``expert_offset`` .. ``expert_offset + num_local``).

Two ways to run the bank: :meth:`ExpertBank.forward` on capacity buckets ``[E, C, D]``
(one ``bmm`` per GEMM, padding rows included) and :meth:`ExpertBank.grouped` on rows
already sorted by expert (no padding: each expert multiplies exactly its rows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: dtypes ``torch._grouped_mm`` accepts on CPU (checked against torch 2.13).
_GROUPED_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _grouped_mm_ok(x: torch.Tensor) -> bool:
    """Whether torch's fused grouped GEMM runs for ``x`` here; else the segment loop."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cpu":
        return x.dtype in _GROUPED_CPU_DTYPES
    if x.device.type == "cuda":  # the CUDA kernel wants bf16 on Hopper or newer
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
    return False


class ExpertBank(nn.Module):
    def __init__(self, num_experts: int, d_model: int, hidden: int, init_std: float) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.num_local = num_experts
        self.expert_offset = 0
        self.w_gate_EDF = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.w_up_EDF = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.w_down_EFD = nn.Parameter(torch.empty(num_experts, hidden, d_model))
        for p in (self.w_gate_EDF, self.w_up_EDF, self.w_down_EFD):
            nn.init.normal_(p, std=init_std)

    def forward(self, x_ECD: torch.Tensor) -> torch.Tensor:
        """Apply local expert e to bucket e: ``[E_local, C, D] -> [E_local, C, D]``."""
        dtype = self.w_gate_EDF.dtype
        x_ECD = x_ECD.to(dtype)
        h_ECF = F.silu(torch.bmm(x_ECD, self.w_gate_EDF)) * torch.bmm(x_ECD, self.w_up_EDF)
        return torch.bmm(h_ECF, self.w_down_EFD)

    def grouped(self, x_ND: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Apply local expert e to its ``counts[e]`` consecutive rows: ``[N, D] -> [N, D]``.

        One grouped GEMM per weight (``torch._grouped_mm``) where torch has one for this
        device and dtype, else :func:`grouped_reference`. Experts with no rows still take
        part, so every expert weight is in the autograd graph (zero gradient) and every
        rank reduces the same expert gradients.
        """
        x_ND = x_ND.to(self.w_gate_EDF.dtype)
        if len(counts) != self.num_local:
            raise ValueError(f"{len(counts)} row counts for {self.num_local} local experts")
        if not _grouped_mm_ok(x_ND):
            return grouped_reference(self, x_ND, counts)
        offs = torch.tensor(counts, dtype=torch.int64).cumsum(0).to(torch.int32)
        offs = offs.to(x_ND.device)
        gate_NF = torch._grouped_mm(x_ND, self.w_gate_EDF, offs=offs)
        up_NF = torch._grouped_mm(x_ND, self.w_up_EDF, offs=offs)
        return torch._grouped_mm(F.silu(gate_NF) * up_NF, self.w_down_EFD, offs=offs)

    def keep_slice(self, offset: int, count: int) -> None:
        """Keep experts ``offset .. offset+count-1`` only (expert parallelism)."""
        with torch.no_grad():
            for name in ("w_gate_EDF", "w_up_EDF", "w_down_EFD"):
                full = getattr(self, name)
                setattr(self, name, nn.Parameter(full[offset : offset + count].clone()))
        self.expert_offset = offset
        self.num_local = count

    def extra_repr(self) -> str:
        d, f = self.w_gate_EDF.shape[1:]
        where = f"{self.num_local}@{self.expert_offset}"
        return f"experts={self.num_experts}, local={where}, d={d}, hidden={f}"


def grouped_reference(bank: ExpertBank, x_ND: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """:meth:`ExpertBank.grouped` as a loop over expert segments (any device and dtype).

    The oracle for the fused grouped GEMM and its fallback.
    """
    x_ND = x_ND.to(bank.w_gate_EDF.dtype)
    # unbind, not w[e] per expert: the backward of one unbind stacks the E gradients once,
    # while E separate selects would each materialise a zero [E, D, F] gradient (O(E^2)).
    gates, ups, downs = (w.unbind(0) for w in (bank.w_gate_EDF, bank.w_up_EDF, bank.w_down_EFD))
    outs = []
    for x_nD, w_g, w_u, w_d in zip(torch.split(x_ND, counts), gates, ups, downs, strict=True):
        outs.append((F.silu(x_nD @ w_g) * (x_nD @ w_u)) @ w_d)
    if not outs:
        return x_ND.new_zeros(0, bank.w_down_EFD.shape[2])
    return torch.cat(outs, 0)
