"""A SwinV2 built under deepspeed.zero.Init on 2 real ranks equals the unpartitioned model."""
import pytest

from tests.distributed import run_deepspeed


@pytest.mark.distributed
def test_zero_init_build_equals_plain_build():
    proc = run_deepspeed("tests/zero_init_build.py", timeout=600)
    assert proc.stdout.count("zero.Init build identical") == 2, proc.stdout[-3000:]
