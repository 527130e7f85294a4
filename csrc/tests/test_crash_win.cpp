// Crash capture on Windows: the cases a run of the native server cannot set up, where the crash
// directory changes between enable and the crash. Each test starts this executable again as a
// child (IOCPNATIVE_CRASH_CHILD names what the child does to the directory before it faults);
// the parent checks that the child died of the access violation, reads the directory and the
// child's stderr. Run under wine by `nox -s mingw`. (POSIX: tests/test_crash.py.)
#include "iocpnative/platform.hpp"  // windows.h, lean

#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <string>
#include <vector>

#include "iocpnative/crash_dump.hpp"
#include "test_harness.hpp"

using namespace iocpnative;

namespace {

const wchar_t kModeVariable[] = L"IOCPNATIVE_CRASH_CHILD";
const wchar_t kDirVariable[] = L"IOCPNATIVE_CRASH_DIR";

std::string narrow(const std::wstring& w) {
    if (w.empty()) return std::string();
    const int n = WideCharToMultiByte(CP_UTF8, 0, w.data(), static_cast<int>(w.size()), nullptr, 0,
                                      nullptr, nullptr);
    std::string out(static_cast<size_t>(n), '\0');
    WideCharToMultiByte(CP_UTF8, 0, w.data(), static_cast<int>(w.size()), &out[0], n, nullptr,
                        nullptr);
    return out;
}

std::wstring variable(const wchar_t* name) {
    wchar_t buf[1024];
    const DWORD n = GetEnvironmentVariableW(name, buf, 1024);
    return n > 0 && n < 1024 ? std::wstring(buf, n) : std::wstring();
}

// "iocpnative-<pid>-<UTC time>.dmp" for one second of `when`.
std::wstring dump_name(DWORD pid, std::time_t when) {
    std::tm utc{};
    gmtime_s(&utc, &when);
    wchar_t stamp[32];
    wcsftime(stamp, 32, L"%Y%m%dT%H%M%SZ", &utc);
    return L"iocpnative-" + std::to_wstring(pid) + L"-" + stamp + L".dmp";
}

// The child: enable dumps into `dir`, change the directory as `mode` says, fault.
[[noreturn]] void run_child(const std::wstring& mode, const std::wstring& dir) {
    // No crash dialog (Windows) and no debugger started (wine): the process just ends.
    SetErrorMode(SEM_FAILCRITICALERRORS | SEM_NOGPFAULTERRORBOX);
    enable_crash_dumps(narrow(dir));
    if (mode == L"vanish" || mode == L"file") {
        if (!RemoveDirectoryW(dir.c_str())) std::_Exit(3);
    }
    if (mode == L"file") {
        HANDLE h = CreateFileW(dir.c_str(), GENERIC_WRITE, 0, nullptr, CREATE_NEW, 0, nullptr);
        if (h == INVALID_HANDLE_VALUE) std::_Exit(4);
        CloseHandle(h);
    }
    if (mode == L"taken") {
        // Every name this crash can get, from one second before to five after.
        const std::time_t now = std::time(nullptr);
        for (std::time_t t = now - 1; t <= now + 5; ++t) {
            const std::wstring path = dir + L"\\" + dump_name(GetCurrentProcessId(), t);
            HANDLE h = CreateFileW(path.c_str(), GENERIC_WRITE, 0, nullptr, CREATE_NEW, 0, nullptr);
            if (h == INVALID_HANDLE_VALUE) std::_Exit(5);
            CloseHandle(h);  // an empty file: an older dump would not be empty
        }
    }
    std::fflush(stdout);
    trigger_test_crash();
}

struct ChildResult {
    DWORD exit_code = 0;
    std::string err;  // what it wrote to stderr
};

// Runs this executable's test `test` as a child in `mode` on `dir`.
ChildResult run_as_child(const char* test, const wchar_t* mode, const std::wstring& dir) {
    SetEnvironmentVariableW(kModeVariable, mode);
    SetEnvironmentVariableW(kDirVariable, dir.c_str());
    SECURITY_ATTRIBUTES inherit{sizeof(SECURITY_ATTRIBUTES), nullptr, TRUE};
    HANDLE read_end = nullptr, write_end = nullptr;
    ASSERT_TRUE(CreatePipe(&read_end, &write_end, &inherit, 0));
    SetHandleInformation(read_end, HANDLE_FLAG_INHERIT, 0);
    wchar_t exe[MAX_PATH];
    ASSERT_TRUE(GetModuleFileNameW(nullptr, exe, MAX_PATH) > 0);
    std::wstring cmd = L"\"" + std::wstring(exe) + L"\" ";
    for (const char* c = test; *c != '\0'; ++c) cmd += static_cast<wchar_t>(*c);
    STARTUPINFOW si{};
    si.cb = sizeof si;
    si.dwFlags = STARTF_USESTDHANDLES;
    si.hStdInput = GetStdHandle(STD_INPUT_HANDLE);
    si.hStdOutput = GetStdHandle(STD_OUTPUT_HANDLE);
    si.hStdError = write_end;
    PROCESS_INFORMATION pi{};
    ASSERT_TRUE(
        CreateProcessW(exe, &cmd[0], nullptr, nullptr, TRUE, 0, nullptr, nullptr, &si, &pi));
    CloseHandle(write_end);
    SetEnvironmentVariableW(kModeVariable, nullptr);
    SetEnvironmentVariableW(kDirVariable, nullptr);
    ChildResult r;
    char buf[4096];
    DWORD n = 0;
    while (ReadFile(read_end, buf, sizeof buf, &n, nullptr) && n > 0) r.err.append(buf, n);
    CloseHandle(read_end);
    ASSERT_EQ(WaitForSingleObject(pi.hProcess, 120 * 1000), WAIT_OBJECT_0);
    ASSERT_TRUE(GetExitCodeProcess(pi.hProcess, &r.exit_code));
    CloseHandle(pi.hThread);
    CloseHandle(pi.hProcess);
    return r;
}

// A fresh directory under %TEMP% (wine reuses small pids: the tick count keeps the name new);
// `sub` (not created) is returned inside it.
std::wstring make_temp_dir(const wchar_t* sub) {
    wchar_t tmp[MAX_PATH];
    ASSERT_TRUE(GetTempPathW(MAX_PATH, tmp) > 0);
    LARGE_INTEGER ticks;
    QueryPerformanceCounter(&ticks);
    const std::wstring base = std::wstring(tmp) + L"iocpnative-crash-test-" +
                              std::to_wstring(GetCurrentProcessId()) + L"-" +
                              std::to_wstring(ticks.QuadPart);
    ASSERT_TRUE(CreateDirectoryW(base.c_str(), nullptr));
    return base + L"\\" + sub;
}

// Removes `dir` (a directory of files, or a file) and its parent made by make_temp_dir.
void remove_temp_dir(const std::wstring& dir) {
    WIN32_FIND_DATAW fd;
    HANDLE h = FindFirstFileW((dir + L"\\*").c_str(), &fd);
    if (h != INVALID_HANDLE_VALUE) {
        do {
            if ((fd.dwFileAttributes & FILE_ATTRIBUTE_DIRECTORY) == 0) {
                DeleteFileW((dir + L"\\" + fd.cFileName).c_str());
            }
        } while (FindNextFileW(h, &fd));
        FindClose(h);
    }
    if (!RemoveDirectoryW(dir.c_str())) DeleteFileW(dir.c_str());
    RemoveDirectoryW(dir.substr(0, dir.find_last_of(L'\\')).c_str());
}

struct Found {
    std::wstring name;
    ULONGLONG size;
};

std::vector<Found> dumps_in(const std::wstring& dir) {
    std::vector<Found> out;
    WIN32_FIND_DATAW fd;
    HANDLE h = FindFirstFileW((dir + L"\\*.dmp").c_str(), &fd);
    if (h == INVALID_HANDLE_VALUE) return out;
    do {
        out.push_back({fd.cFileName, (ULONGLONG(fd.nFileSizeHigh) << 32) | fd.nFileSizeLow});
    } while (FindNextFileW(h, &fd));
    FindClose(h);
    return out;
}

// Tells whether this process is a child; runs the child if so.
void child_if_asked() {
    const std::wstring mode = variable(kModeVariable);
    if (!mode.empty()) run_child(mode, variable(kDirVariable));
}

}  // namespace

TEST_CASE(directory_removed_after_enable_is_created_again) {
    child_if_asked();
    const std::wstring dir = make_temp_dir(L"dumps");
    const ChildResult r =
        run_as_child("directory_removed_after_enable_is_created_again", L"vanish", dir);
    const auto found = dumps_in(dir);
    if (found.size() != 1) std::fprintf(stderr, "child's stderr:\n%s\n", r.err.c_str());
    ASSERT_EQ(r.exit_code, static_cast<DWORD>(EXCEPTION_ACCESS_VIOLATION));
    ASSERT_EQ(found.size(), static_cast<size_t>(1));
    ASSERT_TRUE(found[0].size > 0);
    remove_temp_dir(dir);
    return testh::kPass;
}

TEST_CASE(dump_that_cannot_be_written_is_announced_on_stderr) {
    child_if_asked();
    const std::wstring dir = make_temp_dir(L"dumps");
    const ChildResult r =
        run_as_child("dump_that_cannot_be_written_is_announced_on_stderr", L"file", dir);
    const std::string expected = "iocpnative: no crash dump written: cannot create " + narrow(dir);
    const bool said = r.err.find(expected) != std::string::npos;
    if (!said) std::fprintf(stderr, "child's stderr:\n%s\n", r.err.c_str());
    ASSERT_EQ(r.exit_code, static_cast<DWORD>(EXCEPTION_ACCESS_VIOLATION));
    ASSERT_TRUE(said);
    remove_temp_dir(dir);
    return testh::kPass;
}

TEST_CASE(dump_name_already_taken_gets_a_number) {
    child_if_asked();
    const std::wstring dir = make_temp_dir(L"dumps");
    const ChildResult r = run_as_child("dump_name_already_taken_gets_a_number", L"taken", dir);
    ASSERT_EQ(r.exit_code, static_cast<DWORD>(EXCEPTION_ACCESS_VIOLATION));
    std::vector<std::wstring> written;
    for (const Found& f : dumps_in(dir)) {
        if (f.size > 0) written.push_back(f.name);
    }
    if (written.size() != 1) std::fprintf(stderr, "child's stderr:\n%s\n", r.err.c_str());
    ASSERT_EQ(written.size(), static_cast<size_t>(1));
    const std::wstring& name = written[0];
    ASSERT_TRUE(name.size() > 6 && name.compare(name.size() - 6, 6, L"-2.dmp") == 0);
    remove_temp_dir(dir);
    return testh::kPass;
}

TEST_MAIN()
