"""Sessions, one meaning each: ``nox -s build test`` is the README's test command.

build      sdist + wheel into dist/
test       install the wheel from dist/ (building it if missing), run pytest and the C++ tests
lint       ruff + clang-format check
bench      side-by-side benchmark with ../shared/bench -> docs/benchmarks.md + .png (`-- --quick`)
mingw      cross-build for Windows (MinGW-w64), run the C++ tests and the wine tests under wine
sanitize   C++ tests under ASan+UBSan (LSan on) and TSan; pytest against an ASan build of the module
valgrind   the C++ stress and server tests under memcheck (epoll): 0 bytes definitely/indirectly
           lost, 0 errors
soak       mixed traffic for N minutes (``nox -s soak -- --minutes N``), echoes and RSS checked
"""

from __future__ import annotations

import os
import re
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


# What a wheel is built from: a wheel older than any of these is stale.
SOURCES = ("csrc", "python", "cmake", "CMakeLists.txt", "pyproject.toml")


def _newest_source_mtime() -> float:
    newest = 0.0
    for name in SOURCES:
        path = ROOT / name
        files = path.rglob("*") if path.is_dir() else [path]
        for f in files:
            # Bytecode and an extension module linked into python/ for development are not sources.
            if f.is_file() and "__pycache__" not in f.parts and f.suffix not in {".pyc", ".so"}:
                newest = max(newest, f.stat().st_mtime)
    return newest


def _wheel() -> Path | None:
    """The newest wheel in dist/ for this interpreter (nox's sessions run on the Python that runs
    nox), or None."""
    tag = f"-cp{sys.version_info.major}{sys.version_info.minor}-"
    wheels = sorted(
        (p for p in DIST.glob("iocpnative-*.whl") if tag in p.name), key=lambda p: p.stat().st_mtime
    )
    return wheels[-1] if wheels else None


def _wheel_or_build(session: nox.Session) -> Path:
    """The newest wheel in dist/ for this Python, built first when there is none or when a source
    changed after it was built (so `nox -s test` alone never tests stale code)."""
    wheel = _wheel()
    if wheel is not None and wheel.stat().st_mtime < _newest_source_mtime():
        session.log(f"{wheel.name} is older than the sources: building it again")
        wheel = None
    if wheel is None:
        session.install("build")
        session.run("python", "-m", "build", "--wheel", "--outdir", str(DIST), str(ROOT))
        wheel = _wheel()
    assert wheel is not None
    return wheel


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
    wheel = _wheel_or_build(session)
    session.install(*TEST_DEPS, "cmake", "ninja")
    session.install("--force-reinstall", "--no-deps", str(wheel))
    # `import iocpnative` finds the installed wheel: pytest puts tests/ (conftest.py's folder) on
    # sys.path, never python/.
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
    """ruff (lint + format check) on the Python code and clang-format on csrc/."""
    session.install(*nox.project.dependency_groups(PYPROJECT, "lint"))
    session.run("ruff", "check", "python", "tests", "benchmarks", "noxfile.py")
    session.run("ruff", "format", "--check", "python", "tests", "benchmarks", "noxfile.py")
    sources = sorted(
        str(p) for p in (ROOT / "csrc").rglob("*") if p.suffix in {".cpp", ".hpp", ".h"}
    )
    session.run("clang-format", "--dry-run", "--Werror", *sources)


@nox.session(reuse_venv=True)
def bench(session: nox.Session) -> None:
    """Build ../shared/bench's tools into build/shared-bench ($BENCH_HOME) and a Release wheel,
    run benchmarks/run.py, write docs/benchmarks.md and docs/benchmarks.png.

    Long (about half an hour on 2 CPUs); `nox -s bench -- --quick` runs one short round of each.
    Not part of CI. Needs cc, liburing-dev and PyPI (uvloop) for ../shared/bench/build.sh.
    """
    shared = ROOT.parent / "shared" / "bench"
    if not (shared / "peers.py").exists():
        session.error(f"{shared} not found: the comparison needs ../shared/bench")
    # ../shared is read-only for us, but as root build.sh and peers.py see it as writable and
    # would put bin/ and .venv/ there: BENCH_HOME (the same default as benchmarks/run.py's)
    # sends them into our build/. The peers' bytecode goes there too (they import a module
    # that lives in ../shared/bench). Both reach peers.py through run.py's subprocesses.
    home = os.environ.get("BENCH_HOME") or str(ROOT / "build" / "shared-bench")
    pycache = os.environ.get("PYTHONPYCACHEPREFIX") or str(Path(home) / "pycache")
    env = {"BENCH_HOME": home, "PYTHONPYCACHEPREFIX": pycache}
    session.run("bash", str(shared / "build.sh"), env=env, external=True)
    out = ROOT / "build" / "bench-dist"
    shutil.rmtree(out, ignore_errors=True)
    session.install("build")
    # pyproject.toml builds the extension as Release.
    session.run("python", "-m", "build", "--wheel", "--outdir", str(out), str(ROOT))
    session.install("--force-reinstall", "--no-deps", *map(str, out.glob("iocpnative-*.whl")))
    session.install("matplotlib")  # docs/benchmarks.png
    session.run("python", str(ROOT / "benchmarks" / "run.py"), *session.posargs, env=env)


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
    wheel = _wheel_or_build(session)
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


# --- proof: sanitizers, valgrind, soak (issue 6) ----------------------------------------------

SANITIZERS = ROOT / "tests" / "sanitizers"
# Sanitizer options shared by every run: stop at the first report, with a stack; LeakSanitizer
# on. abort_on_error makes a report fail the process loudly even where the exit code is ignored.
ASAN_OPTIONS = (
    "detect_leaks=1:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1"
)
UBSAN_OPTIONS = "halt_on_error=1:print_stacktrace=1"


def _sanitizer_cxx() -> str:
    """clang++ where installed (CI apt-gets it), else g++: both support the three sanitizers."""
    return "clang++" if shutil.which("clang++") else "g++"


@nox.session(reuse_venv=True)
def sanitize(session: nox.Session) -> None:
    """C++ tests under ASan+UBSan and TSan, then pytest against an ASan build of the module."""
    session.install(*TEST_DEPS, "cmake", "ninja", "pybind11")
    cxx = _sanitizer_cxx()
    session.log(f"C++ sanitizer builds with {cxx}")
    asan_env = {"ASAN_OPTIONS": ASAN_OPTIONS, "UBSAN_OPTIONS": UBSAN_OPTIONS}
    tsan_supp = SANITIZERS / "tsan.supp"
    tsan_env = {"TSAN_OPTIONS": f"halt_on_error=1:second_deadlock_stack=1:suppressions={tsan_supp}"}
    for kind, env in (("address", asan_env), ("thread", tsan_env)):
        build_dir = ROOT / "build" / f"sanitize-{kind}"
        _cmake_build(
            session, build_dir, "-DCMAKE_BUILD_TYPE=RelWithDebInfo",
            f"-DIOCPNATIVE_SANITIZE={kind}", f"-DCMAKE_CXX_COMPILER={cxx}",
        )  # fmt: skip
        session.run(
            "ctest", "--test-dir", str(build_dir), "--output-on-failure", "-j", JOBS, env=env
        )

    # The extension module with ASan+UBSan. g++ builds it: Python is not linked against a
    # sanitizer runtime, so g++'s shared libasan is preloaded into the interpreter.
    build_dir = ROOT / "build" / "sanitize-python"
    python = str(Path(session.virtualenv.location) / "bin" / "python")
    pybind11_dir = session.run("python", "-m", "pybind11", "--cmakedir", silent=True).strip()
    _cmake_build(
        session, build_dir, "-DCMAKE_BUILD_TYPE=RelWithDebInfo", "-DIOCPNATIVE_SANITIZE=address",
        "-DCMAKE_CXX_COMPILER=g++", "-DIOCPNATIVE_PYTHON=ON", f"-DPython_EXECUTABLE={python}",
        f"-Dpybind11_DIR={pybind11_dir}", targets=("_native",),
    )  # fmt: skip
    site = build_dir / "site"
    shutil.rmtree(site, ignore_errors=True)
    shutil.copytree(ROOT / "python" / "iocpnative", site / "iocpnative")
    for so in build_dir.glob("_native*.so"):
        shutil.copy2(so, site / "iocpnative")
    # libstdc++ is preloaded too: python does not link it, so without it ASan's __cxa_throw
    # interceptor finds no real __cxa_throw and the first C++ exception aborts (a CHECK failure).
    preload = [
        session.run("g++", f"-print-file-name={lib}", silent=True, external=True).strip()
        for lib in ("libasan.so", "libstdc++.so.6")
    ]
    py_env = {
        "LD_PRELOAD": " ".join(preload),
        "PYTHONPATH": str(site),
        # Every Python allocation through malloc, so ASan checks the module's use of Python
        # objects too and LSan sees the objects it might leak.
        "PYTHONMALLOC": "malloc",
        "ASAN_OPTIONS": ASAN_OPTIONS,
        "UBSAN_OPTIONS": UBSAN_OPTIONS,
        "LSAN_OPTIONS": f"suppressions={SANITIZERS / 'lsan_python.supp'}:print_suppressions=1",
    }
    session.run(
        "python", "-c",
        "import iocpnative._native as n, sys; print(n.__file__); "
        f"sys.exit(not n.__file__.startswith({str(site)!r}))",
        env=py_env,
    )  # fmt: skip
    # The whole suite but the crash-capture tests: they fault on purpose, and under ASan the
    # sanitizer's own SIGSEGV handler reports and exits first (its job), so the capture path
    # they check cannot run. They run in `nox -s test`, and test_crash under ctest's ASan build.
    # The wine tests need the MinGW build (`nox -s mingw`). The interpreter-exit test ends a
    # process whose native threads are still inside Python handlers: CPython never frees what
    # threads alive at finalization hold (by design), so LSan would report those interpreter
    # objects; it runs in `nox -s test`.
    session.run(
        "pytest", *(session.posargs or ["-q"]), "-p", "no:cacheprovider", "-m", "not wine",
        "-k", "not test_interpreter_exit_with_running_handler_server",
        "--rootdir", str(ROOT), "-c", str(ROOT / "pyproject.toml"), str(ROOT / "tests"),
        f"--ignore={ROOT / 'tests' / 'test_crash.py'}", env=py_env,
    )  # fmt: skip


VALGRIND_TESTS = (("test_stress", "--all"), ("test_server", "--all"))


def _check_valgrind_log(session: nox.Session, log: Path) -> None:
    """Fails unless memcheck reported 0 errors and 0 bytes definitely or indirectly lost."""
    text = log.read_text()
    errors = re.search(r"ERROR SUMMARY: ([\d,]+) errors", text)
    if errors is None:
        session.error(f"{log}: no ERROR SUMMARY (did valgrind run to the end?)")
    figures = {"errors": int(errors.group(1).replace(",", ""))}
    for kind in ("definitely", "indirectly"):
        m = re.search(rf"{kind} lost: ([\d,]+) bytes", text)
        # Without a LEAK SUMMARY memcheck says "All heap blocks were freed": nothing lost.
        if m is None and "All heap blocks were freed" not in text:
            session.error(f"{log}: no '{kind} lost' figure and no 'All heap blocks were freed'")
        figures[f"{kind}_lost_bytes"] = int(m.group(1).replace(",", "")) if m else 0
    heap = re.search(r"total heap usage: ([\d,]+) allocs, ([\d,]+) frees", text)
    session.log(f"{log.name}: {figures}" + (f", heap {heap.group(0)}" if heap else ""))
    if any(figures.values()):
        session.error(f"{log}: memcheck found problems: {figures}")


@nox.session(reuse_venv=True)
def valgrind(session: nox.Session) -> None:
    """The C++ stress test (hundreds of clients, data in flight, stop) and the server tests under
    valgrind memcheck, on epoll (memcheck cannot follow io_uring)."""
    session.install("cmake", "ninja")
    build_dir = ROOT / "build" / "valgrind"
    targets = tuple(exe for exe, _ in VALGRIND_TESTS)
    _cmake_build(session, build_dir, "-DCMAKE_BUILD_TYPE=RelWithDebInfo", targets=targets)
    for exe, case in VALGRIND_TESTS:
        log = build_dir / f"{exe}.memcheck.log"
        session.run(
            "valgrind", "--tool=memcheck", "--leak-check=full",
            "--show-leak-kinds=definite,indirect", "--errors-for-leak-kinds=definite,indirect",
            "--error-exitcode=1", f"--log-file={log}",
            str(build_dir / "csrc" / "tests" / exe), case, external=True,
            # memcheck cannot see the kernel fill buffers through an io_uring ring, and
            # valgrind 3.19 hangs in the ring's wait: io_uring is proven by ASan/TSan instead.
            # ("auto" too: IOCPNATIVE_BACKEND decides what it resolves to).
            env={"IOCPNATIVE_TEST_SKIP_BACKENDS": "io_uring", "IOCPNATIVE_BACKEND": "epoll"},
        )  # fmt: skip
        _check_valgrind_log(session, log)


@nox.session(reuse_venv=True)
def soak(session: nox.Session) -> None:
    """Mixed traffic against the installed wheel: ``nox -s soak -- --minutes N``."""
    wheel = _wheel_or_build(session)
    session.install("--force-reinstall", "--no-deps", str(wheel))
    session.run("python", str(ROOT / "tests" / "soak.py"), *session.posargs)


if __name__ == "__main__":
    sys.exit("run with nox")
