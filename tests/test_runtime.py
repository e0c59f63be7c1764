import subprocess
import sys

import pytest

from embedkit.runtime import retain_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_malloc_tuning_applies_once_and_can_be_disabled():
    assert retain_freed_memory() is True
    assert retain_freed_memory() is True  # idempotent
    code = "from embedkit.runtime import retain_freed_memory as r; print(r())"
    off = subprocess.run([sys.executable, "-c", code], env={"EMBEDKIT_MALLOC_TUNING": "0"}, capture_output=True, text=True)
    assert off.stdout.strip() == "False", off.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_malloc_tuning_can_keep_the_default_arenas():
    code = "from embedkit.runtime import retain_freed_memory as r; print(r(single_arena=False), r())"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.stdout.split() == ["True", "True"], run.stderr  # applied, then the first call's settings stay
