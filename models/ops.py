"""The routing ops the layers call: fused kernels from csrc/ when built, else the reference.

Every layer calls routing through this module (never ``routing`` directly), so that one
switch decides between the fused ``turnout._C`` ops and the pure-PyTorch reference.
"""

from __future__ import annotations

from turnout.models import routing as _ref

moe_plan = _ref.moe_plan
permute = _ref.permute
combine = _ref.combine
mod_select = _ref.mod_select


def backend() -> str:
    """Which implementation the layers use: 'reference' until csrc/ ops are loaded."""
    return "reference"
