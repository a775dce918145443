"""A SwinV2 built under deepspeed.zero.Init on 2 real ranks equals the unpartitioned model."""
import re

import pytest

from tests.distributed import run_torchrun


@pytest.mark.distributed
def test_zero_init_build_equals_plain_build():
    proc = run_torchrun("tests/zero_init_build.py", timeout=600)
    assert proc.stdout.count("zero.Init build identical") == 2, proc.stdout[-3000:]


@pytest.mark.distributed
def test_zero_init_giant_widths_split_in_half_and_match():
    """SwinV2-G's widths with fewer blocks (340M parameters, fp32): each rank holds half, the output is exact."""
    proc = run_torchrun("tests/zero_init_build.py", "giant", timeout=600)
    lines = re.findall(r"rank (\d): giant zero.Init owns (\d+) of (\d+) parameters, output identical", proc.stdout)
    assert len(lines) == 2, proc.stdout[-3000:]
    owned = {int(rank): int(n) for rank, n, _ in lines}
    total = int(lines[0][2])
    assert total > 300_000_000 and owned[0] + owned[1] == total and abs(owned[0] - owned[1]) <= 1000
