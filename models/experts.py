"""A bank of SwiGLU experts stored as stacked weights, applied to rows sorted by expert.

Shape legend: E experts held here (local), C bucket rows, D model width, F expert hidden,
N rows sorted expert-major (expert e owns ``counts_E[e]`` consecutive rows).
On one rank the bank holds all experts; under expert parallelism ``turnout.parallel``
keeps only this rank's slice (``expert_offset`` .. ``expert_offset + num_local``).

The bank's forward runs each expert on exactly its rows (no padding), with one grouped
GEMM per weight (``torch._grouped_mm``) where torch has a fast one for the device and
dtype, else :func:`grouped_reference`, a loop over the expert segments that is also the
oracle of the grouped GEMM. :func:`buckets_reference` runs the bank on capacity buckets
``[E, C, D]`` (one ``bmm`` per weight, padding rows included): the old path, kept as the
tests' oracle only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: dtypes ``torch._grouped_mm`` accepts on CPU (checked against torch 2.13).
_GROUPED_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _grouped_mm_ok(x: torch.Tensor, hidden: int | None = None) -> bool:
    """Whether torch's fused grouped GEMM runs for rows ``x`` through experts of width
    ``hidden`` here; else the segment loop. It wants every row stride (``D`` and ``F``
    elements) a multiple of 16 bytes."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    widths = (x.shape[-1],) if hidden is None else (x.shape[-1], hidden)
    if any(w * x.element_size() % 16 for w in widths):
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

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor | list[int]) -> torch.Tensor:
        """Apply local expert e to its ``counts_E[e]`` consecutive rows: ``[N, D] -> [N, D]``.

        One grouped GEMM per weight (``torch._grouped_mm``) where torch has one for this
        device and dtype (its group offsets stay on the device: no host sync), else
        :func:`grouped_reference`. Experts with no rows still take part, so every expert
        weight is in the autograd graph (zero gradient) and every rank reduces the same
        expert gradients. Being the module's forward, it is what ZeRO-3's hooks gather
        the expert weights for.
        """
        x_ND = x_ND.to(self.w_gate_EDF.dtype).contiguous()
        n = len(counts_E) if isinstance(counts_E, list) else counts_E.shape[0]
        if n != self.num_local:
            raise ValueError(f"{n} row counts for {self.num_local} local experts")
        if not _grouped_mm_ok(x_ND, self.w_gate_EDF.shape[2]):
            listed = counts_E if isinstance(counts_E, list) else counts_E.tolist()
            return grouped_reference(self, x_ND, listed)
        offs_E = torch.cumsum(torch.as_tensor(counts_E, device=x_ND.device), 0, dtype=torch.int32)
        gate_NF = torch._grouped_mm(x_ND, self.w_gate_EDF, offs=offs_E)
        up_NF = torch._grouped_mm(x_ND, self.w_up_EDF, offs=offs_E)
        return torch._grouped_mm(F.silu(gate_NF) * up_NF, self.w_down_EFD, offs=offs_E)

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
    """The bank's forward as a loop over expert segments (any device and dtype).

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


def buckets_reference(bank: ExpertBank, x_ECD: torch.Tensor) -> torch.Tensor:
    """Apply local expert e to bucket e: ``[E, C, D] -> [E, C, D]``, one ``bmm`` per weight,
    padding rows included. The bucket path's experts: a test oracle, no layer's path."""
    x_ECD = x_ECD.to(bank.w_gate_EDF.dtype)
    h_ECF = F.silu(torch.bmm(x_ECD, bank.w_gate_EDF)) * torch.bmm(x_ECD, bank.w_up_EDF)
    return torch.bmm(h_ECF, bank.w_down_EFD)
