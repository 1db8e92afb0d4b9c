"""The README's runnable example runs, and its two set-up commands are the ones CI uses."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)


def test_the_local_example_runs_and_delivers(tmp_path: Path) -> None:
    [example] = [b for b in python_blocks() if "LocalServer" in b]
    script = tmp_path / "example.py"
    script.write_text(example, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert "'delivered': 20" in done.stdout


def test_every_python_block_compiles() -> None:
    for block in python_blocks():
        compile(block, "README.md", "exec", flags=0x2000)  # top-level await allowed


def test_ci_runs_the_readme_test_command() -> None:
    command = "pip install -e '.[test]' && pytest"
    assert command in README
    assert command in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "pip install '.[cli]' && asmtp demo" in README
