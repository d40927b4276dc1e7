"""A bank of SwiGLU experts stored as stacked weights, applied with batched GEMMs.

Shape legend: E experts held here (local), C bucket rows, D model width, F expert hidden.
On one rank the bank holds all experts; under expert parallelism ``turnout.parallel``
keeps only this rank's slice (``expert_offset`` .. ``expert_offset + num_local``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
