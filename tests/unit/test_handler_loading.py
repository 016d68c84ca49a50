"""``--handler`` finds modules in the current directory without letting them shadow others.

The current directory used to go *first* on ``sys.path``: a stray ``json.py`` or
``tabnanny.py`` next to the config replaced the standard library module for the
whole process. It now goes last, so the handler's own module is still found.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from dedupe_consumer.loading import load_handler_class

from .test_replay import line, write_recording

REPO = Path(__file__).resolve().parents[2]
SHADOW = 'raise RuntimeError("the current directory shadowed the standard library")\n'
HANDLERS = """
import tabnanny  # a standard library module nothing else imports

from dedupe_consumer import Event, Handler


class Quiet(Handler):
    def handle(self, event: Event) -> None:
        assert tabnanny.__file__ is not None
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "tabnanny.py").write_text(SHADOW)
    (tmp_path / "my_handlers.py").write_text(HANDLERS)
    return tmp_path


def test_the_handler_module_is_found_and_the_stdlib_is_not_shadowed(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(project)
    # Neither the cwd nor '' (which `python -m pytest` puts first) may be on the path yet.
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(project))])
    for name in ("tabnanny", "my_handlers"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    cls = load_handler_class("my_handlers:Quiet")
    assert cls.__name__ == "Quiet"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert Path(sys.modules["tabnanny"].__file__ or "").parent == stdlib
    assert sys.path[-1] == str(project)  # appended, not prepended
    for name in ("tabnanny", "my_handlers"):
        sys.modules.pop(name, None)


def test_the_cli_loads_a_handler_from_the_cwd_without_shadowing(project: Path) -> None:
    recording = write_recording(project / "r.jsonl", [line(0, 0, "a"), line(0, 1, "b")])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # -P: no implicit '' on sys.path, as with the installed `dedupe-consumer` script.
    command = [sys.executable, "-P", "-m", "dedupe_consumer", "replay", str(recording)]
    proc = subprocess.run(
        [*command, "--handler", "my_handlers:Quiet", "--json"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert '"ok": true' in proc.stdout
