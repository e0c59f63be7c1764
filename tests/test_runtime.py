import subprocess
import sys

import pytest

from embedkit.engine.runtime import retain_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_malloc_tuning_applies_once_and_can_be_disabled():
    assert retain_freed_memory() is True
    assert retain_freed_memory() is True  # idempotent
    code = "from embedkit.engine.runtime import retain_freed_memory as r; print(r())"
    off = subprocess.run([sys.executable, "-c", code], env={"EMBEDKIT_MALLOC_TUNING": "0"}, capture_output=True, text=True)
    assert off.stdout.strip() == "False", off.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_malloc_tuning_can_keep_the_default_arenas():
    code = "from embedkit.engine.runtime import retain_freed_memory as r; print(r(single_arena=False), r())"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.stdout.split() == ["True", "True"], run.stderr  # applied, then the first call's settings stay


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_the_library_leaves_the_allocator_alone_and_the_command_tunes_it(tmp_path):
    """Process-wide settings belong to the `embedkit` command: a program calling the API keeps
    its own, and the command's worker processes inherit the command's through the environment."""
    import os

    src = tmp_path / "docs.jsonl"
    src.write_text('{"id": "a", "text": "one short text"}\n')
    env = {k: v for k, v in os.environ.items() if k != "EMBEDKIT_MALLOC_TUNING"}
    library = (
        "import os, embedkit, embedkit.engine.runtime as rt\n"
        f"embedkit.encode({str(src)!r}, {str(tmp_path / 'lib')!r}, device='cpu', progress=False)\n"
        "embedkit.encode_texts(['a query'], device='cpu')\n"
        "print(rt._done, os.environ.get('EMBEDKIT_MALLOC_TUNING'))\n"
    )
    command = (
        "import os, embedkit.engine.runtime as rt\nfrom click.testing import CliRunner\nfrom embedkit.cli import main\n"
        f"r = CliRunner().invoke(main, ['encode', {str(src)!r}, {str(tmp_path / 'cli')!r}, '-q'])\n"
        "print(r.exit_code, rt._done, os.environ.get('EMBEDKIT_MALLOC_TUNING'))\n"
    )
    lib = subprocess.run([sys.executable, "-c", library], env=env, capture_output=True, text=True)
    assert lib.stdout.split()[-2:] == ["False", "None"], lib.stderr[-2000:]
    cli = subprocess.run([sys.executable, "-c", command], env=env, capture_output=True, text=True)
    assert cli.stdout.split()[-3:] == ["0", "True", "1"], cli.stderr[-2000:]
