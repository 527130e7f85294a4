"""Crash capture on Linux: each crash runs in a child Python process that must die of the signal
and leave a .crash report behind; the parent reads the report."""

from __future__ import annotations

import errno
import os
import re
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import iocpnative

pytestmark = pytest.mark.skipif(
    sys.platform == "win32", reason="POSIX signal handler; Windows is covered by test_wine_crash"
)

REPORT_NAME = re.compile(r"^iocpnative-(\d+)-\d{8}T\d{6}Z\.crash$")


def _no_core_files() -> None:
    # The children die of SIGSEGV/SIGABRT on purpose: keep core files out of the test run.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_child(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Runs `code` in a fresh interpreter that imports iocpnative the same way this one does."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=_no_core_files,
        env={**os.environ, "PYTHONFAULTHANDLER": ""},
    )


def reports(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.crash")) if directory.exists() else []


def only_report(directory: Path, pid: int | None = None) -> str:
    found = reports(directory)
    assert len(found) == 1, f"expected one report in {directory}, found {found}"
    match = REPORT_NAME.match(found[0].name)
    assert match, found[0].name
    if pid is not None:
        assert int(match.group(1)) == pid
    text = found[0].read_text()
    assert text.startswith("iocpnative crash report\n")
    assert text.rstrip().endswith("end of report"), "the report was cut short"
    return text


def assert_native_frame(text: str) -> None:
    backtrace = text.split("backtrace", 1)[1]
    # backtrace_symbols_fd names the module of each frame; ours is the _native extension, and
    # trigger_test_crash is exported from it, so it appears by name.
    assert "_native" in backtrace, backtrace
    assert "trigger_test_crash" in backtrace, backtrace


CRASH_IN_MAIN = """
    import sys
    import iocpnative
    print(iocpnative.enable_crash_dumps(sys.argv[1]), flush=True)
    iocpnative.trigger_test_crash()
"""


def test_crash_writes_report_and_dies_of_sigsegv(tmp_path: Path) -> None:
    target = tmp_path / "not" / "yet" / "there"  # a missing nested directory is created
    child = run_child(CRASH_IN_MAIN, str(target))
    assert child.returncode == -signal.SIGSEGV, child.stderr
    assert child.stdout.strip() == str(target.resolve())
    text = only_report(target)
    assert "signal: SIGSEGV (11)\n" in text
    assert "si_code: 1 SEGV_MAPERR" in text
    assert "fault address: 0x0000000000000000\n" in text
    assert f"version: {iocpnative.__version__}\n" in text
    assert "(main thread)" in text
    assert_native_frame(text)


def test_crash_on_another_thread_is_reported(tmp_path: Path) -> None:
    child = run_child(
        """
        import sys, threading
        import iocpnative
        iocpnative.enable_crash_dumps(sys.argv[1])
        t = threading.Thread(target=iocpnative.trigger_test_crash)
        t.start()
        t.join()
        """,
        str(tmp_path),
    )
    assert child.returncode == -signal.SIGSEGV, child.stderr
    text = only_report(tmp_path, pid=None)
    assert "signal: SIGSEGV (11)\n" in text
    thread_line = re.search(r"^thread id: (\d+)(.*)$", text, re.MULTILINE)
    assert thread_line and thread_line.group(2) == "", "the crash was on a non-main thread"
    pid = int(re.search(r"^pid: (\d+)$", text, re.MULTILINE).group(1))  # type: ignore[union-attr]
    assert int(thread_line.group(1)) != pid
    assert_native_frame(text)


@pytest.mark.parametrize("order", ["faulthandler first", "faulthandler last"])
def test_faulthandler_still_runs(tmp_path: Path, order: str) -> None:
    # Either order must give both outputs: ours chains to a handler installed before it, and
    # faulthandler installed after ours chains to ours.
    first, last = (
        ("faulthandler.enable()", "iocpnative.enable_crash_dumps(sys.argv[1])")
        if order == "faulthandler first"
        else ("iocpnative.enable_crash_dumps(sys.argv[1])", "faulthandler.enable()")
    )
    child = run_child(
        f"""
        import faulthandler, sys
        import iocpnative
        {first}
        {last}
        iocpnative.trigger_test_crash()
        """,
        str(tmp_path),
    )
    assert child.returncode == -signal.SIGSEGV, child.stderr
    assert "Fatal Python error: Segmentation fault" in child.stderr
    assert "line 6 in <module>" in child.stderr  # faulthandler's Python traceback
    assert "signal: SIGSEGV (11)\n" in only_report(tmp_path)


def test_enable_again_changes_the_directory(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    child = run_child(
        """
        import sys
        import iocpnative
        iocpnative.enable_crash_dumps(sys.argv[1])
        iocpnative.enable_crash_dumps(sys.argv[2])
        assert iocpnative.crash_dump_directory() == sys.argv[2]
        iocpnative.trigger_test_crash()
        """,
        str(first),
        str(second),
    )
    assert child.returncode == -signal.SIGSEGV, child.stderr
    assert first.is_dir() and reports(first) == []
    assert "signal: SIGSEGV" in only_report(second)


def test_disable_restores_the_previous_behaviour(tmp_path: Path) -> None:
    child = run_child(
        """
        import sys
        import iocpnative
        iocpnative.enable_crash_dumps(sys.argv[1])
        iocpnative.disable_crash_dumps()
        assert iocpnative.crash_dump_directory() is None
        iocpnative.trigger_test_crash()
        """,
        str(tmp_path),
    )
    assert child.returncode == -signal.SIGSEGV, child.stderr
    assert reports(tmp_path) == []


def test_abort_is_reported_as_sigabrt(tmp_path: Path) -> None:
    child = run_child(
        """
        import os, sys
        import iocpnative
        iocpnative.enable_crash_dumps(sys.argv[1])
        os.abort()
        """,
        str(tmp_path),
    )
    assert child.returncode == -signal.SIGABRT, child.stderr
    text = only_report(tmp_path)
    assert "signal: SIGABRT (6)\n" in text
    assert "si_code: -6 SI_TKILL" in text  # sent by abort(3) itself, not by the kernel


@pytest.mark.parametrize("backend", iocpnative.available_backends())
def test_cli_server_crash_dump_dir(tmp_path: Path, backend: str) -> None:
    # A running server killed with SIGSEGV from outside: the report says who sent it, and the
    # server still dies of SIGSEGV.
    dumps = tmp_path / "dumps"
    cmd = [sys.executable, "-m", "iocpnative", "server", "--port", "0", "--backend", backend]
    with subprocess.Popen(
        [*cmd, "--workers", "2", "--crash-dump-dir", str(dumps)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_no_core_files,
    ) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == f"crash dumps go to {dumps.resolve()}"
        assert "listening on" in proc.stdout.readline()
        os.kill(proc.pid, signal.SIGSEGV)
        assert proc.wait(timeout=30) == -signal.SIGSEGV
    text = only_report(dumps, pid=proc.pid)
    assert "si_code: 0 SI_USER" in text
    assert f"sent by pid: {os.getpid()}\n" in text


def test_enable_returns_absolute_path_and_disable_clears(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    try:
        where = iocpnative.enable_crash_dumps(Path("rel") / "dir")
        assert where == str((tmp_path / "rel" / "dir").resolve())
        assert iocpnative.crash_dump_directory() == where
    finally:
        iocpnative.disable_crash_dumps()
    assert iocpnative.crash_dump_directory() is None


def test_directory_under_a_regular_file_is_enotdir(tmp_path: Path) -> None:
    plain = tmp_path / "plain-file"
    plain.write_text("not a directory")
    for impossible in (plain / "sub", plain):
        with pytest.raises(OSError) as info:
            iocpnative.enable_crash_dumps(impossible)
        assert info.value.errno == errno.ENOTDIR, info.value
    assert iocpnative.crash_dump_directory() is None


def test_empty_directory_is_rejected() -> None:
    with pytest.raises(ValueError):
        iocpnative.enable_crash_dumps("")


def test_directory_name_that_is_not_utf8(tmp_path: Path) -> None:
    # Linux file names are bytes; Python hands an undecodable byte to us as a surrogate escape
    # (os.fsdecode), as os.listdir and sys.argv do. Such a directory must work like any other,
    # given directly or reached through a symlink (the returned path is the resolved one).
    latin1 = tmp_path / os.fsdecode(b"caf\xe9")
    link = tmp_path / "link"
    link.symlink_to(latin1, target_is_directory=True)
    try:
        for given in (latin1, link):
            assert iocpnative.enable_crash_dumps(given) == str(latin1)
            assert iocpnative.crash_dump_directory() == str(latin1)
    finally:
        iocpnative.disable_crash_dumps()
    assert latin1.is_dir()


def test_directory_removed_after_enable_is_created_again(tmp_path: Path) -> None:
    # A long-running server outlives its empty crash directory (a /tmp cleaner, say): the
    # report must not be lost for it. enable promised the directory is created if missing.
    target = tmp_path / "a" / "b"
    child = run_child(
        """
        import os, sys
        import iocpnative
        iocpnative.enable_crash_dumps(sys.argv[1])
        os.rmdir(sys.argv[1])
        os.rmdir(os.path.dirname(sys.argv[1]))
        iocpnative.trigger_test_crash()
        """,
        str(target),
    )
    assert child.returncode == -signal.SIGSEGV, child.stderr
    assert "signal: SIGSEGV (11)\n" in only_report(target)


def test_report_that_cannot_be_written_is_announced_on_stderr(tmp_path: Path) -> None:
    # The directory became a regular file: no report can be written, and the process must say
    # so (and still die of the signal) rather than leave the user looking for a file.
    target = tmp_path / "dumps"
    child = run_child(
        """
        import os, sys
        import iocpnative
        iocpnative.enable_crash_dumps(sys.argv[1])
        os.rmdir(sys.argv[1])
        open(sys.argv[1], "w").close()
        iocpnative.trigger_test_crash()
        """,
        str(target),
    )
    assert child.returncode == -signal.SIGSEGV, child.stderr
    assert "iocpnative: no crash report written: cannot create " + str(target) in child.stderr
    assert f"(errno {errno.ENOTDIR})" in child.stderr


def test_report_name_already_taken_gets_a_number(tmp_path: Path) -> None:
    # In a PID namespace (a container restarted after a crash) the next crash can have the same
    # pid within the same second: the name is taken, and the new report must not be lost.
    child = run_child(
        """
        import os, sys, time
        import iocpnative
        where = iocpnative.enable_crash_dumps(sys.argv[1])
        now = int(time.time())
        for second in range(now - 1, now + 5):  # every name this crash can get
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(second))
            name = f"iocpnative-{os.getpid()}-{stamp}.crash"
            with open(os.path.join(where, name), "w") as taken:
                taken.write("an older report\\n")
        iocpnative.trigger_test_crash()
        """,
        str(tmp_path),
    )
    assert child.returncode == -signal.SIGSEGV, child.stderr
    new = [p for p in reports(tmp_path) if p.read_text() != "an older report\n"]
    assert len(new) == 1, reports(tmp_path)
    assert re.match(r"^iocpnative-\d+-\d{8}T\d{6}Z-2\.crash$", new[0].name), new[0].name
    assert new[0].read_text().rstrip().endswith("end of report")


def test_announcement_to_a_closed_pipe_still_dies_of_the_signal(tmp_path: Path) -> None:
    # The stderr line must not change how the process dies: with SIGPIPE at its default (a C++
    # host; Python ignores it) and stderr a pipe nobody reads any more, writing the line raised
    # SIGPIPE, and the process died of that instead of SIGSEGV.
    target = tmp_path / "dumps"
    with subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                """
                import os, signal, sys
                import iocpnative
                signal.signal(signal.SIGPIPE, signal.SIG_DFL)
                iocpnative.enable_crash_dumps(sys.argv[1])
                os.rmdir(sys.argv[1])
                open(sys.argv[1], "w").close()
                print("ready", flush=True)
                sys.stdin.readline()  # the parent has closed our stderr's read end
                iocpnative.trigger_test_crash()
                """
            ),
            str(target),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_no_core_files,
    ) as proc:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline() == "ready\n"
        proc.stderr.close()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.wait(timeout=60) == -signal.SIGSEGV
