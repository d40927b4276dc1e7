"""The first-use self-check of the fused kernels (models/kernel_check.py) catches bad ops."""

from __future__ import annotations

import types

import pytest
import torch

from turnout.models import kernels
from turnout.models.kernel_check import mismatches

pytestmark = pytest.mark.unit

CPU = torch.device("cpu")


@pytest.fixture
def built() -> None:
    if kernels.forced_reference():
        pytest.skip("TURNOUT_KERNELS forces the reference")
    assert kernels.load(), "the csrc/ kernels must build on this machine"


def _namespace(**replace: object) -> types.SimpleNamespace:
    names = ("moe_plan", "mod_select", "mode_plan", "permute", "combine")
    ops = {n: getattr(torch.ops.turnout, n) for n in names}
    ops.update(replace)
    return types.SimpleNamespace(**ops)


def test_cpu_kernels_pass(built: None) -> None:
    assert mismatches(CPU) == []
    assert kernels.supports(torch.zeros(1))


def test_a_wrong_plan_is_caught(built: None) -> None:
    def swapped(*args: object) -> tuple[torch.Tensor, ...]:
        expert, gate, slot, keep, counts = torch.ops.turnout.moe_plan(*args)
        return expert.flip(1), gate, slot, keep, counts

    assert any(
        m.startswith("moe_plan.expert") for m in mismatches(CPU, _namespace(moe_plan=swapped))
    )


def test_wrong_rows_and_raising_ops_are_caught(built: None) -> None:
    def noisy(*args: object) -> torch.Tensor:
        return torch.ops.turnout.combine(*args) + 1e-3

    def broken(*args: object) -> torch.Tensor:
        raise RuntimeError("no kernel image is available for execution on the device")

    assert mismatches(CPU, _namespace(combine=noisy)) == ["combine: differs from the reference"]
    found = mismatches(CPU, _namespace(mod_select=broken))
    assert found == ["RuntimeError: no kernel image is available for execution on the device"]


def test_a_failed_check_routes_to_the_reference(built: None) -> None:
    saved = dict(kernels._checked)
    try:
        kernels._checked["cpu"] = False
        assert not kernels.supports(torch.zeros(1))
    finally:
        kernels._checked.clear()
        kernels._checked.update(saved)


def _swapped_plan(*args: object) -> tuple[torch.Tensor, ...]:
    expert, gate, slot, keep, counts = torch.ops.turnout.moe_plan(*args)
    return expert.flip(1), gate, slot, keep, counts


def test_a_patched_op_falls_back_to_the_reference(
    built: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TURNOUT_KERNELS", raising=False)
    monkeypatch.setattr(kernels, "_checked", {})
    with pytest.warns(RuntimeWarning, match="moe_plan.expert.*pure-PyTorch reference"):
        assert kernels._check_device(CPU, _namespace(moe_plan=_swapped_plan)) is False
    assert not kernels.supports(torch.zeros(1))  # the verdict holds for the run


def test_strict_kernels_make_a_mismatch_an_error(
    built: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TURNOUT_KERNELS", "1")
    monkeypatch.setattr(kernels, "_checked", {})
    with pytest.raises(kernels.KernelMismatchError, match="moe_plan.expert.*TURNOUT_KERNELS=1"):
        kernels._check_device(CPU, _namespace(moe_plan=_swapped_plan))
    monkeypatch.setattr(kernels, "_checked", {})
    assert kernels._check_device(CPU) is True  # the real kernels pass, strict or not
