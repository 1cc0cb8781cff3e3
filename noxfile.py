"""Nox sessions: the suite on every supported Python, the package check, the newest SDK.

Run them from the project environment (``bash scripts/bootstrap`` installs nox):

    .venv/bin/nox                  # tests on each supported Python, then build
    .venv/bin/nox -s tests         # pytest -m "not e2e" on 3.11, 3.12 and 3.13
    .venv/bin/nox -s tests-3.12    # one Python only
    .venv/bin/nox -s build         # sdist + wheel, twine check, wheel in a fresh venv
    .venv/bin/nox -s sdk_latest    # the suite against the newest singer-sdk release

The Python versions are the ``Programming Language :: Python :: 3.x`` classifiers
in pyproject.toml. Sessions use uv and install the versions pinned in uv.lock.
A Python that is not installed is skipped with a message ("Python interpreter
3.x not found"), also under CI=true; pass ``--error-on-missing-interpreters``
to make that an error. Python builds are never downloaded.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import zipfile
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
PYPROJECT = nox.project.load_toml(ROOT / "pyproject.toml")
PYTHONS: list[str] = nox.project.python_versions(PYPROJECT)
PACKAGE = "tap_invoca_destinations"
EXECUTABLE = "tap-invoca-destinations"

nox.needs_version = ">=2025.5.1"
nox.options.default_venv_backend = "uv"
nox.options.sessions = ["tests", "build"]
nox.options.download_python = "never"
# nox makes a missing interpreter an error when CI is set; this project claims
# every Python in PYTHONS but a machine may lack some, so skip them visibly.
nox.options.error_on_missing_interpreters = False
os.environ["UV_PYTHON_DOWNLOADS"] = "never"


def _expose_pyenv_pythons() -> None:
    """Put pyenv's interpreters for PYTHONS on PATH, as python3.X only.

    pyenv's shims answer only for the selected version, so nox would not find the
    others. A folder of ``python3.X`` links (nothing else: ``python3`` keeps
    meaning what it meant) is put at the front of PATH.

    Several nox processes may start at once (scripts/test runs sessions side by
    side), so a link is replaced atomically and never missing while it is wanted.
    """
    pyenv_root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    links = ROOT / ".nox" / "_pythons"
    wanted: set[str] = set()
    for minor in PYTHONS:
        candidates = sorted(
            (pyenv_root / "versions").glob(f"{minor}.*/bin/python{minor}"),
            key=lambda p: [int(n) for n in re.findall(r"\d+", p.parent.parent.name)],
        )
        if not candidates:
            continue
        links.mkdir(parents=True, exist_ok=True)
        link = links / f"python{minor}"
        wanted.add(link.name)
        fresh = links / f".python{minor}.{os.getpid()}"
        fresh.unlink(missing_ok=True)
        fresh.symlink_to(candidates[-1])
        fresh.replace(link)
    for stale in links.glob("python*"):
        if stale.name not in wanted:
            stale.unlink(missing_ok=True)
    if links.is_dir():
        os.environ["PATH"] = f"{links}{os.pathsep}{os.environ.get('PATH', '')}"


_expose_pyenv_pythons()


def _sync(session: nox.Session, *groups: str) -> None:
    """Install the project and the locked versions of `groups` into the session's venv."""
    venv = session.virtualenv.location
    session.run_install(
        "uv",
        "sync",
        "--locked",
        "--quiet",
        "--no-default-groups",
        *(f"--group={group}" for group in groups),
        "--compile-bytecode",  # the CLI tests start the tap many times
        f"--python={venv}",
        env={"UV_PROJECT_ENVIRONMENT": venv},
    )


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """Unit and integration tests (everything but e2e) with the locked dependencies."""
    _sync(session, "test")
    session.run("pytest", "-m", "not e2e", *session.posargs)


@nox.session(python=PYTHONS[-1])
def sdk_latest(session: nox.Session) -> None:
    """The same tests against the newest singer-sdk release (see docs/sdk-upgrade.md)."""
    _sync(session, "test")
    session.run_install(
        "uv",
        "pip",
        "install",
        f"--python={session.virtualenv.location}",
        "--upgrade",
        "singer-sdk[msgspec,testing]",
    )
    session.run(
        "python",
        "-c",
        "import importlib.metadata as m; print('singer-sdk', m.version('singer-sdk'))",
    )
    session.run("pytest", "-m", "not e2e", *session.posargs)


@nox.session(python=PYTHONS[0])
def build(session: nox.Session) -> None:
    """Build sdist and wheel from the checkout, check them, install the wheel, run --about.

    The wheel goes into this session's fresh virtual environment with its
    dependencies constrained to uv.lock; the CLI then runs from another folder,
    so nothing is imported from the checkout.
    """
    work = Path(tempfile.mkdtemp(prefix="build-check-", dir=session.create_tmp()))
    dist = work / "dist"
    session.run("uv", "build", "--quiet", "--out-dir", str(dist), str(ROOT))
    wheels = sorted(dist.glob("*.whl"))
    sdists = sorted(dist.glob("*.tar.gz"))
    if len(wheels) != 1 or len(sdists) != 1:
        session.error(
            f"expected one wheel and one sdist in {dist}, found {[p.name for p in dist.iterdir()]}"
        )
    wheel = wheels[0]
    version = wheel.name.split("-")[1]

    names = zipfile.ZipFile(wheel).namelist()
    stray = [n for n in names if not n.startswith((f"{PACKAGE}/", f"{PACKAGE}-"))]
    if stray:
        session.error(f"the wheel holds files outside the package: {stray}")

    constraints = work / "constraints.txt"
    session.run_install(
        "uv",
        "export",
        "--locked",
        "--quiet",
        "--no-hashes",
        "--no-emit-project",
        "--no-default-groups",
        "--group=tools",
        f"--output-file={constraints}",
    )
    session.install("--constraints", str(constraints), str(wheel), "twine")
    session.run("twine", "check", "--strict", *map(str, (*sdists, wheel)))

    session.chdir(work)
    about = session.run(EXECUTABLE, "--about", "--format=json", silent=True)
    info = json.loads(str(about))
    if info.get("name") != EXECUTABLE or "discover" not in info.get("capabilities", []):
        session.error(f"unexpected --about output: {about}")
    printed = str(session.run(EXECUTABLE, "--version", silent=True)).strip()
    session.log(printed)
    if f"v{version}," not in printed:
        session.error(f"--version printed {printed!r}, expected version {version}")
    session.log(f"{wheel.name}: installed in a fresh venv; --about and --version work")


@nox.session(python="3.12")
def pyairbyte(session: nox.Session) -> None:
    """The Airbyte source end to end with the real PyAirbyte client (Python 3.12, offline).

    PyAirbyte (``airbyte``) supports Python 3.10-3.12 only and weighs a lot, so it
    gets this environment of its own, from the pinned tests/pyairbyte/requirements.txt
    (which installs this project too); the main test environment never imports it.
    """
    session.install("-r", str(ROOT / "tests" / "pyairbyte" / "requirements.txt"))
    session.run(
        "pytest",
        str(ROOT / "tests" / "pyairbyte" / "e2e_pyairbyte.py"),
        # Not the project's addopts: they spread tests over cores with pytest-xdist,
        # which this environment does not have (and its few tests run in turn).
        "-o",
        "addopts=-ra",
        "-p",
        "no:randomly",
        # PyAirbyte and its CDK warn on import (experimental classes, ...): not ours to fail on.
        "-W",
        "default",
        *session.posargs,
        env={"AIRBYTE_OFFLINE_MODE": "1", "DO_NOT_TRACK": "1"},
    )
