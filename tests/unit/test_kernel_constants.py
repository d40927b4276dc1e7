"""Numbers crossing the Python/C++ boundary are defined once, in csrc/routing.h."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from turnout.models import kernels, ops

pytestmark = pytest.mark.unit

CSRC = Path(kernels.csrc_dir())
MODELS = Path(ops.__file__).parent


def _header_numbers() -> dict[str, int]:
    """Parse the header independently of kernels.header_constants."""
    found = {}
    for line in (CSRC / "routing.h").read_text().splitlines():
        m = re.fullmatch(r"constexpr int64_t (k[A-Za-z]+) = (\d+);", line.strip())
        if m and not line.startswith(" "):
            found[m.group(1)] = int(m.group(2))
    return found


def test_python_reads_the_header_numbers() -> None:
    header = _header_numbers()
    assert {"kMaxCudaColumns", "kPlanTile", "kWarpSize"} <= set(header)
    assert kernels.header_constants() == header
    assert ops.CUDA_MAX_COLUMNS == header["kMaxCudaColumns"] == 1024
    with pytest.raises(KeyError, match="kNoSuchNumber"):
        kernels.header_constant("kNoSuchNumber")


def test_the_shared_memory_budget_holds() -> None:
    # One int histogram per warp of a plan tile, for every column, in 48 KiB of shared memory.
    h = _header_numbers()
    assert (h["kPlanTile"] // h["kWarpSize"]) * h["kMaxCudaColumns"] * 4 <= 48 * 1024


@pytest.mark.parametrize("name", ["kMaxCudaColumns", "kPlanTile"])
def test_no_copy_of_a_boundary_number_outside_the_header(name: str) -> None:
    n = _header_numbers()[name]
    literal = re.compile(rf"(?<![\w.])({n}|{n - 1})(?![\w.])")  # N, or N - 1 of a ceil-div
    copies = []
    for path in [*CSRC.glob("*.cpp"), *CSRC.glob("*.cu"), *MODELS.glob("*.py")]:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("//")[0].split("#")[0]
            # Other constants may share the value (a named thread count of 256 is not the
            # tile); what must not exist is a bare literal in code.
            if literal.search(code) and "constexpr" not in code:
                copies.append(f"{path.name}:{i}: {line.strip()}")
    assert not copies, copies
