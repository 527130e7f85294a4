"""Sessions, one meaning each: ``nox -s build test`` is the README's test command.

build      sdist + wheel into dist/
test       install the wheel from dist/ (building it if missing), run pytest and the C++ tests
lint       ruff + clang-format check
bench      side-by-side benchmark with ../shared/bench -> docs/benchmarks.md (`-- --quick`)
mingw      cross-build for Windows (MinGW-w64), run the C++ tests and the wine tests under wine
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import nox

nox.needs_version = ">=2025.2.9"
nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True

ROOT = Path(__file__).resolve().parent
DIST = ROOT / "dist"
PYPROJECT = nox.project.load_toml(ROOT / "pyproject.toml")
TEST_DEPS = nox.project.dependency_groups(PYPROJECT, "test")
JOBS = str(os.cpu_count() or 2)


def _wheel() -> Path | None:
    wheels = sorted(DIST.glob("iocpnative-*.whl"), key=lambda p: p.stat().st_mtime)
    return wheels[-1] if wheels else None


def _cmake_build(
    session: nox.Session, build_dir: Path, *defines: str, targets: tuple[str, ...] = ()
) -> None:
    """Configure and build the core, the C++ tests and the tools with CMake + Ninja."""
    session.run(
        "cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
        "-DIOCPNATIVE_PYTHON=OFF", "-DIOCPNATIVE_TESTS=ON", "-DIOCPNATIVE_TOOLS=ON",
        "-DIOCPNATIVE_WERROR=ON", *defines,
    )  # fmt: skip
    session.run(
        "cmake", "--build", str(build_dir), "-j", JOBS, *(("--target", *targets) if targets else ())
    )


@nox.session(reuse_venv=True)
def build(session: nox.Session) -> None:
    """Build the sdist and the wheel (from the sdist) into dist/."""
    session.install("build")
    shutil.rmtree(DIST, ignore_errors=True)
    session.run("python", "-m", "build", "--outdir", str(DIST), str(ROOT))


@nox.session(reuse_venv=True)
def test(session: nox.Session) -> None:
    """pytest against the installed wheel, then the C++ tests with CTest."""
    wheel = _wheel()
    if wheel is None:
        session.install("build")
        session.run("python", "-m", "build", "--wheel", "--outdir", str(DIST), str(ROOT))
        wheel = _wheel()
    assert wheel is not None
    session.install(*TEST_DEPS, "cmake", "ninja")
    session.install("--force-reinstall", "--no-deps", str(wheel))
    # Run from tests/ so that `import iocpnative` finds the installed wheel, not python/.
    session.run(
        "pytest", *(session.posargs or ["-q"]), "-p", "no:cacheprovider",
        # The wine tests need the MinGW build: `nox -s mingw` runs them.
        "-m", "not wine",
        "--rootdir", str(ROOT), "-c", str(ROOT / "pyproject.toml"), str(ROOT / "tests"),
    )  # fmt: skip
    build_dir = ROOT / "build" / "ctest"
    _cmake_build(session, build_dir, "-DCMAKE_BUILD_TYPE=RelWithDebInfo")
    session.run("ctest", "--test-dir", str(build_dir), "--output-on-failure", "-j", JOBS)


@nox.session(reuse_venv=True)
def lint(session: nox.Session) -> None:
    """ruff (lint + format check) and clang-format on csrc/."""
    session.install("ruff", "clang-format")
    session.run("ruff", "check", "python", "tests", "noxfile.py")
    session.run("ruff", "format", "--check", "python", "tests", "noxfile.py")
    sources = sorted(
        str(p) for p in (ROOT / "csrc").rglob("*") if p.suffix in {".cpp", ".hpp", ".h"}
    )
    session.run("clang-format", "--dry-run", "--Werror", *sources)


@nox.session(reuse_venv=True)
def bench(session: nox.Session) -> None:
    """Build ../shared/bench and a Release wheel, run benchmarks/run.py, write docs/benchmarks.md.

    Long (about half an hour on 2 CPUs); `nox -s bench -- --quick` runs one short round of each.
    Not part of CI. Needs cc, liburing-dev and PyPI (uvloop) for ../shared/bench/build.sh.
    """
    shared = ROOT.parent / "shared" / "bench"
    if not (shared / "peers.py").exists():
        session.error(f"{shared} not found: the comparison needs ../shared/bench")
    session.run("bash", str(shared / "build.sh"), external=True)
    out = ROOT / "build" / "bench-dist"
    shutil.rmtree(out, ignore_errors=True)
    session.install("build")
    # pyproject.toml builds the extension as Release.
    session.run("python", "-m", "build", "--wheel", "--outdir", str(out), str(ROOT))
    session.install("--force-reinstall", "--no-deps", *map(str, out.glob("iocpnative-*.whl")))
    session.run("python", str(ROOT / "benchmarks" / "run.py"), *session.posargs)


MINGW_CXX = ("x86_64-w64-mingw32-g++-posix", "x86_64-w64-mingw32-g++")


@nox.session(reuse_venv=True)
def mingw(session: nox.Session) -> None:
    """Windows build checked on Linux: cross-compile the core, the C++ tests and the tools with
    MinGW-w64, run the C++ tests under wine (CTest's emulator), then the pytest tests marked
    `wine` (tests/test_wine*.py) against iocpnative-server.exe under wine."""
    missing = [
        what
        for what, found in (
            ("x86_64-w64-mingw32-g++ (apt-get install g++-mingw-w64-x86-64)",
             any(shutil.which(c) for c in MINGW_CXX)),
            ("wine (apt-get install wine)", shutil.which("wine")),
            ("wineserver (apt-get install wine)", shutil.which("wineserver")),
        )
        if not found
    ]  # fmt: skip
    if missing:
        session.error("nox -s mingw needs " + " and ".join(missing) + ": not found on PATH")
    wheel = _wheel()
    if wheel is None:
        session.install("build")
        session.run("python", "-m", "build", "--wheel", "--outdir", str(DIST), str(ROOT))
        wheel = _wheel()
    assert wheel is not None
    session.install(*TEST_DEPS, "cmake", "ninja")
    session.install("--force-reinstall", "--no-deps", str(wheel))

    build_dir = ROOT / "build" / "mingw"
    toolchain = ROOT / "cmake" / "toolchains" / "mingw-w64.cmake"
    _cmake_build(
        session,
        build_dir,
        f"-DCMAKE_TOOLCHAIN_FILE={toolchain}",
        "-DCMAKE_BUILD_TYPE=RelWithDebInfo",
    )
    tools = build_dir / "csrc" / "tools"
    # A fresh prefix of our own (nothing in $HOME), outside the source tree: its z: drive links
    # to /, and the sdist build walks the tree following links (build/ included).
    prefix = Path(tempfile.mkdtemp(prefix="iocpnative-wine-"))
    env = {
        "WINEPREFIX": str(prefix),
        "WINEDEBUG": "-all",
        "WINEDLLOVERRIDES": "mscoree,mshtml=",  # no Mono/Gecko install prompts
        "IOCPNATIVE_WINE_SERVER": str(tools / "iocpnative-server.exe"),
        "IOCPNATIVE_WINE_CLIENT": str(tools / "iocpnative-client.exe"),
    }
    try:
        # Create the prefix once, before the timed tests: a first wine start takes seconds.
        session.run("wineboot", "-i", env=env, external=True)
        session.run("wineserver", "-w", env=env, external=True)
        session.run(
            "ctest", "--test-dir", str(build_dir), "--output-on-failure", "-j", JOBS, env=env
        )
        session.run(
            "pytest", *(session.posargs or ["-q"]), "-p", "no:cacheprovider", "-m", "wine",
            "--rootdir", str(ROOT), "-c", str(ROOT / "pyproject.toml"),
            str(ROOT / "tests"), env=env,
        )  # fmt: skip
    finally:
        # Leave no wineserver (or wine process) and no prefix behind.
        session.run("wineserver", "-k", env=env, external=True, success_codes=[0, 1])
        shutil.rmtree(prefix, ignore_errors=True)


if __name__ == "__main__":
    sys.exit("run with nox")
