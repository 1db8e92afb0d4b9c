"""Build hook: ``ASMTP_COMPILE=1 pip install .`` compiles asmtp's hot path with mypyc.

The modules in :data:`COMPILED` (the reply parser, the protocol state machine and its
rules, the steps, the session policy with its endpoint and transaction steps, the
fan-out's dispatcher and the asyncio driver: all checked by mypy --strict) become C
extensions built from the same source; in ``benchmarks/fanout.py`` that is about a third
fewer instructions per message. Without ``ASMTP_COMPILE=1`` (the default) the build does
nothing here and the wheel is pure Python. Needs a C compiler;
mypy and setuptools are fetched into the build environment only when compiling.

The whole test suite passes on both builds. One difference is known: in compiled code
``raise X from exc`` keeps ``exc`` as the implicit context (``__context__``), not as
``__cause__``. The drivers' exception map (_io/exceptions.py) stays Python: it relies on
``__cause__``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

#: the modules every session runs through, compiled together
COMPILED = (
    "_core/reply",
    "_core/capabilities",
    "_core/rules",
    "_core/protocol",
    "_core/steps",
    "_delivery/endpoint",
    "_delivery/session_state",
    "_delivery/exchanges",
    "_delivery/transaction",
    "_delivery/session",
    "_delivery/dispatch",
    "_io/asyncio_driver",
)


def enabled() -> bool:
    return os.environ.get("ASMTP_COMPILE", "") == "1"


class CompileHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def dependencies(self) -> list[str]:
        return ["mypy>=1.10", "setuptools>=68"] if enabled() else []

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel" or not enabled():
            return
        src = Path(self.root) / "src"
        if version == "editable":
            # An editable install imports from src/: the extensions go there, beside
            # the sources they were built from (rebuild after editing those).
            compile_in_place(src, Path(self.root) / "build")
            return
        work = Path(self.root) / "build" / "mypyc"
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(src, work / "src")
        for built in compile_in_place(work / "src", work):
            build_data["force_include"][str(built)] = str(built.relative_to(work / "src"))
        build_data["pure_python"] = False
        build_data["infer_tag"] = True


def compile_in_place(src: Path, scratch: Path) -> list[Path]:
    """Compile the :data:`COMPILED` modules of ``src/asmtp`` with mypyc, beside their
    sources (``scratch`` holds the configuration); return the extensions built. Also
    used by benchmarks/fanout.py for its compiled row."""
    files = [f"asmtp/{name}.py" for name in COMPILED]
    # Compiling needs no strictness (CI checks that) and no other package's types:
    # an empty configuration, not the project's, which mypy would find upwards.
    config = scratch / "mypyc.ini"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("[mypy]\nignore_missing_imports = True\n")
    command = [sys.executable, "-m", "mypyc", "--config-file", str(config), *files]
    done = subprocess.run(command, cwd=src, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"mypyc failed:\n{done.stdout}{done.stderr}")
    built = [p for p in src.glob("*__mypyc*") if p.suffix in (".so", ".pyd")]
    built += [p for p in (src / "asmtp").rglob("*") if p.suffix in (".so", ".pyd")]
    if len(built) < len(COMPILED):
        raise RuntimeError(f"mypyc built {len(built)} extensions for {len(COMPILED)} modules")
    return built
