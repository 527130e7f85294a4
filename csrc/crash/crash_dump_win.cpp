// Crash capture on Windows: an unhandled-exception filter has a minidump written with dbghelp's
// MiniDumpWriteDump, then lets the process die with the same exception code.
//
// Needs: Windows 7 or later (_WIN32_WINNT 0x0601), dbghelp.dll (MiniDumpWriteDump, shipped with
// Windows since XP). Built and run here with MinGW-w64 under wine, which implements
// SetUnhandledExceptionFilter and MiniDumpWriteDump; MSVC builds are unverified.
//
// The dump is written by a thread of our own, created at enable time, while the faulting thread
// waits. Microsoft's documentation of MiniDumpWriteDump advises exactly this (a dump written on
// the faulting thread cannot show that thread's stack faithfully, and after a stack overflow
// there is no stack left to call it on). Nothing on the way allocates: the heap may be what is
// corrupt. The path prefix is prepared at enable time.
//
// Not caught: a fault while a debugger is attached (it gets the exception instead), /GS buffer
// overrun checks and invalid-parameter reports of the MSVC CRT (they reset the filter before
// terminating), and abort() (a CRT signal, not an SEH exception).
#ifdef _WIN32

#include "iocpnative/platform.hpp"  // windows.h, lean

#include <dbghelp.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <cwchar>
#include <stdexcept>
#include <string>

#include "crash_text.hpp"
#include "crash_thread.hpp"
#include "iocpnative/crash_dump.hpp"
#include "iocpnative/errors.hpp"

namespace iocpnative {

namespace {

constexpr DWORD kPathMax = 32768;  // the longest \\?\ path Windows accepts, in UTF-16 units
constexpr size_t kNameReserve = 64;
constexpr DWORD kDumpTimeoutMs = 120 * 1000;
// A dump whose name is taken is numbered -2, -3, ... up to this.
constexpr int kMaxDumpNumber = 100;

// Written by enable/disable under g_lock. The filter and the dump thread only read; the
// prefix ("<dir>\iocpnative-") uses two buffers and a published index, as on POSIX, so that
// re-targeting never rewrites a path the dump thread may be copying. -1: disarmed.
SRWLOCK g_lock = SRWLOCK_INIT;  // an SRW lock: std::mutex is missing with win32-thread MinGW
std::string g_directory;
wchar_t g_prefix[2][kPathMax];
size_t g_root_length[2] = {};  // of g_prefix[i]: the drive or share, which is never created
volatile LONG g_prefix_index = -1;
bool g_installed = false;
LPTOP_LEVEL_EXCEPTION_FILTER g_previous_filter = nullptr;

// The request handed from the faulting thread to the dump thread.
HANDLE g_dump_thread = nullptr;
HANDLE g_request_event = nullptr;  // auto-reset: a crash wants a dump
HANDLE g_done_event = nullptr;     // manual-reset: the dump is written (or failed)
EXCEPTION_POINTERS* volatile g_exception = nullptr;
volatile DWORD g_fault_thread_id = 0;
volatile LONG g_reporter = 0;  // the first faulting thread's id claims the single dump

// Win32 file errors -> errno; the rest goes through the core's Winsock/Win32 mapping.
int errno_from_file_error(DWORD err) noexcept {
    switch (err) {
        case ERROR_ACCESS_DENIED:
        case ERROR_SHARING_VIOLATION:
            return EACCES;
        case ERROR_FILE_NOT_FOUND:
        case ERROR_PATH_NOT_FOUND:
            return ENOENT;
        case ERROR_DIRECTORY:
            return ENOTDIR;
        case ERROR_ALREADY_EXISTS:
        case ERROR_FILE_EXISTS:
            return EEXIST;
        case ERROR_DISK_FULL:
            return ENOSPC;
        case ERROR_WRITE_PROTECT:
            return EROFS;
        case ERROR_FILENAME_EXCED_RANGE:
            return ENAMETOOLONG;
        case ERROR_INVALID_NAME:
        case ERROR_BAD_PATHNAME:
            return EINVAL;
        default:
            return errno_from_native(static_cast<int>(err));
    }
}

[[noreturn]] void throw_last_error(const std::string& what) {
    throw make_system_error(errno_from_file_error(GetLastError()), what);
}

std::wstring widen(const std::string& utf8) {
    if (utf8.empty()) return std::wstring();
    const int n = MultiByteToWideChar(CP_UTF8, MB_ERR_INVALID_CHARS, utf8.data(),
                                      static_cast<int>(utf8.size()), nullptr, 0);
    if (n <= 0) throw_last_error("crash dump directory is not valid UTF-8: " + utf8);
    std::wstring out(static_cast<size_t>(n), L'\0');
    MultiByteToWideChar(CP_UTF8, MB_ERR_INVALID_CHARS, utf8.data(), static_cast<int>(utf8.size()),
                        &out[0], n);
    return out;
}

std::string narrow(const std::wstring& wide) {
    if (wide.empty()) return std::string();
    const int n = WideCharToMultiByte(CP_UTF8, 0, wide.data(), static_cast<int>(wide.size()),
                                      nullptr, 0, nullptr, nullptr);
    if (n <= 0) throw_last_error("cannot convert the crash dump directory to UTF-8");
    std::string out(static_cast<size_t>(n), '\0');
    WideCharToMultiByte(CP_UTF8, 0, wide.data(), static_cast<int>(wide.size()), &out[0], n, nullptr,
                        nullptr);
    return out;
}

std::wstring full_path(const std::wstring& path) {
    const DWORD n = GetFullPathNameW(path.c_str(), 0, nullptr, nullptr);
    if (n == 0) throw_last_error("cannot resolve crash dump directory");
    std::wstring out(n, L'\0');
    const DWORD len = GetFullPathNameW(path.c_str(), n, &out[0], nullptr);
    if (len == 0 || len >= n) throw_last_error("cannot resolve crash dump directory");
    out.resize(len);
    while (out.size() > 3 && (out.back() == L'\\' || out.back() == L'/')) out.pop_back();
    return out;
}

// The extended-length ("\\?\") form of a full path from GetFullPathNameW. Without it every
// file call is limited to MAX_PATH (260 UTF-16 units; 248 for CreateDirectoryW) unless both the
// LongPathsEnabled policy and the executable's manifest opt in, so a deep directory was created
// (or refused) by a path the dump could not then be written to. The prefix turns off the Win32
// path rewriting, which is safe here: GetFullPathNameW has already made the path absolute, with
// backslashes and no "." or ".." components.
std::wstring extended_length(const std::wstring& full) {
    if (full.compare(0, 4, L"\\\\?\\") == 0 || full.compare(0, 4, L"\\\\.\\") == 0) return full;
    if (full.compare(0, 2, L"\\\\") == 0) return L"\\\\?\\UNC\\" + full.substr(2);
    return L"\\\\?\\" + full;
}

// Where the first component that can be created starts: after "C:\" or "\\server\share\".
size_t root_length(const std::wstring& p) {
    if (p.size() >= 2 && p[0] == L'\\' && p[1] == L'\\') {
        size_t pos = 2;
        for (int seps = 0; seps < 2 && pos != std::wstring::npos; ++seps) {
            pos = p.find_first_of(L"\\/", pos + 1);
        }
        return pos == std::wstring::npos ? p.size() : pos;
    }
    return p.size() >= 3 && p[1] == L':' ? 3 : 0;
}

// mkdir -p on an absolute path whose first `root` characters exist (the drive or share):
// ENOTDIR when a component exists and is not a directory.
void make_directories(const std::wstring& dir, size_t root) {
    for (size_t pos = root; pos != std::wstring::npos;) {
        pos = dir.find_first_of(L"\\/", pos + 1);
        const std::wstring part = dir.substr(0, pos);
        const DWORD attrs = GetFileAttributesW(part.c_str());
        if (attrs != INVALID_FILE_ATTRIBUTES) {
            if ((attrs & FILE_ATTRIBUTE_DIRECTORY) != 0) continue;
            throw make_system_error(ENOTDIR, "crash dump path is not a directory: " + narrow(part));
        }
        if (!CreateDirectoryW(part.c_str(), nullptr) && GetLastError() != ERROR_ALREADY_EXISTS) {
            throw_last_error("cannot create crash dump directory " + narrow(part));
        }
    }
}

// Proves the directory writable by creating (and deleting on close) a probe file in it.
void check_writable(const std::wstring& dir) {
    const std::wstring probe = dir + (dir.back() == L'\\' ? L"" : L"\\") + L"iocpnative-probe-" +
                               std::to_wstring(GetCurrentProcessId()) + L".tmp";
    HANDLE h = CreateFileW(probe.c_str(), GENERIC_WRITE, 0, nullptr, CREATE_ALWAYS,
                           FILE_ATTRIBUTE_TEMPORARY | FILE_FLAG_DELETE_ON_CLOSE, nullptr);
    if (h == INVALID_HANDLE_VALUE) {
        throw_last_error("crash dump directory is not writable: " + narrow(dir));
    }
    CloseHandle(h);
}

// "<prefix><pid>-<YYYYMMDDTHHMMSSZ>.dmp", or "-<number>.dmp" for number >= 2, into `out`
// (kPathMax wide characters).
bool dump_path(int prefix_index, const crash_text::Civil& now, int number, wchar_t* out) noexcept {
    char name[kNameReserve];
    crash_text::Text t(name, sizeof name);
    t.put_report_name(static_cast<int64_t>(GetCurrentProcessId()), now, number, ".dmp");
    if (t.truncated()) return false;
    size_t n = 0;
    for (const wchar_t* p = g_prefix[prefix_index]; *p != L'\0' && n + 1 < kPathMax; ++p) {
        out[n++] = *p;
    }
    for (const char* p = t.c_str(); *p != '\0' && n + 1 < kPathMax; ++p) {
        out[n++] = static_cast<wchar_t>(*p);
    }
    out[n] = L'\0';
    return true;
}

// CreateDirectoryW for each directory of `path` after its first `root` characters, in place:
// each backslash is cut to a NUL for one call and put back. One that exists fails, harmlessly.
void make_parent_directories(wchar_t* path, size_t root) noexcept {
    size_t last = 0;
    for (size_t i = root; path[i] != L'\0'; ++i) {
        if (path[i] == L'\\') last = i;
    }
    for (size_t i = root; i <= last; ++i) {
        if (path[i] != L'\\') continue;
        path[i] = L'\0';
        CreateDirectoryW(path, nullptr);
        path[i] = L'\\';
    }
}

// Creates the dump file, or returns INVALID_HANDLE_VALUE with the last error set and `path`
// naming the file that could not be created. As on POSIX: the directory is created again if it
// has gone since enable, and a name already taken (a pid reused within the same second) gets
// "-2", "-3", ... instead of losing the dump.
HANDLE create_dump_file(int prefix_index, wchar_t* path) noexcept {
    SYSTEMTIME st;
    GetSystemTime(&st);
    crash_text::Civil now{};
    now.year = st.wYear;
    now.month = st.wMonth;
    now.day = st.wDay;
    now.hour = st.wHour;
    now.minute = st.wMinute;
    now.second = st.wSecond;
    bool directory_made = false;
    for (int number = 1; number <= kMaxDumpNumber;) {
        if (!dump_path(prefix_index, now, number, path)) {
            SetLastError(ERROR_FILENAME_EXCED_RANGE);
            return INVALID_HANDLE_VALUE;
        }
        HANDLE file = CreateFileW(path, GENERIC_WRITE, 0, nullptr, CREATE_NEW,
                                  FILE_ATTRIBUTE_NORMAL, nullptr);
        if (file != INVALID_HANDLE_VALUE) return file;
        const DWORD err = GetLastError();
        if (err == ERROR_FILE_EXISTS || err == ERROR_ALREADY_EXISTS) {
            ++number;
        } else if (err == ERROR_PATH_NOT_FOUND && !directory_made) {
            make_parent_directories(path, g_root_length[prefix_index]);
            directory_made = true;
        } else {
            SetLastError(err);
            return INVALID_HANDLE_VALUE;
        }
    }
    return INVALID_HANDLE_VALUE;
}

// One line on stderr when no dump could be written, so that its absence is not silent: the
// path in UTF-8 without its \\?\ prefix, and the Windows error code.
void announce_no_dump(const wchar_t* path, DWORD err) noexcept {
    HANDLE out = GetStdHandle(STD_ERROR_HANDLE);
    if (out == nullptr || out == INVALID_HANDLE_VALUE) return;
    static char utf8[kPathMax * 3];  // only the dump thread uses these, once
    static char line[kPathMax * 3 + 128];
    const bool unc = std::wcsncmp(path, L"\\\\?\\UNC\\", 8) == 0;
    const wchar_t* shown = path;
    if (unc) {
        shown = path + 8;
    } else if (std::wcsncmp(path, L"\\\\?\\", 4) == 0) {
        shown = path + 4;
    }
    if (WideCharToMultiByte(CP_UTF8, 0, shown, -1, utf8, static_cast<int>(sizeof utf8), nullptr,
                            nullptr) == 0) {
        utf8[0] = '\0';
    }
    crash_text::Text t(line, sizeof line);
    t.put("iocpnative: no crash dump written: cannot create ");
    if (unc) t.put("\\\\");
    t.put(utf8);
    t.put(" (Windows error ");
    t.put_dec(static_cast<int64_t>(err));
    t.put(")\n");
    DWORD written = 0;
    WriteFile(out, t.data(), static_cast<DWORD>(t.size()), &written, nullptr);
}

void write_dump() noexcept {
    const LONG prefix_index = g_prefix_index;
    if (prefix_index < 0) return;
    static wchar_t path[kPathMax];  // only the dump thread uses it, once
    HANDLE file = create_dump_file(static_cast<int>(prefix_index), path);
    if (file == INVALID_HANDLE_VALUE) {
        announce_no_dump(path, GetLastError());
        return;  // nowhere to write: the process still dies
    }
    MINIDUMP_EXCEPTION_INFORMATION info;
    info.ThreadId = g_fault_thread_id;
    info.ExceptionPointers = g_exception;
    info.ClientPointers = FALSE;  // the pointers are in this process
    // Every thread's stack and context is in every minidump; these add thread times and entry
    // points, the memory that registers and stack slots point at (to follow a pointer in the
    // debugger), and the modules unloaded before the crash.
    const auto type =
        static_cast<MINIDUMP_TYPE>(MiniDumpWithThreadInfo | MiniDumpWithIndirectlyReferencedMemory |
                                   MiniDumpWithUnloadedModules);
    MiniDumpWriteDump(GetCurrentProcess(), GetCurrentProcessId(), file, type,
                      g_exception != nullptr ? &info : nullptr, nullptr, nullptr);
    FlushFileBuffers(file);
    CloseHandle(file);
}

DWORD WINAPI dump_thread_main(LPVOID) {
    for (;;) {
        if (WaitForSingleObject(g_request_event, INFINITE) != WAIT_OBJECT_0) return 1;
        write_dump();
        SetEvent(g_done_event);
    }
}

LONG WINAPI on_unhandled_exception(EXCEPTION_POINTERS* exception) {
    const auto tid = static_cast<LONG>(GetCurrentThreadId());
    // One dump per process: the first faulting thread writes it; any other thread that faults
    // meanwhile waits for that dump before it lets the process die.
    const LONG owner = InterlockedCompareExchange(&g_reporter, tid, 0);
    if (owner == 0 && g_prefix_index >= 0) {
        g_exception = exception;
        g_fault_thread_id = GetCurrentThreadId();
        SetEvent(g_request_event);
        WaitForSingleObject(g_done_event, kDumpTimeoutMs);
    } else if (owner != 0 && owner != tid) {
        WaitForSingleObject(g_done_event, kDumpTimeoutMs);
    }
    // Chain to the filter installed before ours; with none, EXCEPTION_CONTINUE_SEARCH lets the
    // system end the process with this exception's code (and Windows Error Reporting run).
    if (g_previous_filter != nullptr) return g_previous_filter(exception);
    return EXCEPTION_CONTINUE_SEARCH;
}

void start_dump_thread_locked() {
    if (g_dump_thread != nullptr) return;
    g_request_event = CreateEventW(nullptr, FALSE, FALSE, nullptr);
    g_done_event = CreateEventW(nullptr, TRUE, FALSE, nullptr);
    if (g_request_event == nullptr || g_done_event == nullptr) {
        const DWORD err = GetLastError();
        if (g_request_event != nullptr) CloseHandle(g_request_event);
        if (g_done_event != nullptr) CloseHandle(g_done_event);
        g_request_event = g_done_event = nullptr;
        throw make_system_error(errno_from_file_error(err), "CreateEvent for the crash handler");
    }
    // A small stack is enough for MiniDumpWriteDump; the thread lives as long as the process.
    g_dump_thread = CreateThread(nullptr, 256 * 1024, dump_thread_main, nullptr,
                                 STACK_SIZE_PARAM_IS_A_RESERVATION, nullptr);
    if (g_dump_thread == nullptr) throw_last_error("CreateThread for the crash handler");
}

class Locked {
  public:
    Locked() noexcept { AcquireSRWLockExclusive(&g_lock); }
    ~Locked() { ReleaseSRWLockExclusive(&g_lock); }
    Locked(const Locked&) = delete;
    Locked& operator=(const Locked&) = delete;
};

}  // namespace

void crash::prepare_thread() noexcept {
    // Keep this much stack for the exception filter after a stack overflow. A failure only
    // costs the dump of a stack overflow on this thread, so it is not reported.
    ULONG reserve = 32 * 1024;
    SetThreadStackGuarantee(&reserve);
}

void enable_crash_dumps(const std::string& directory) {
    if (directory.empty()) throw std::invalid_argument("crash dump directory must not be empty");
    const std::wstring abs = full_path(widen(directory));
    const std::wstring ext = extended_length(abs);
    const size_t root = root_length(abs) + (ext.size() - abs.size());
    make_directories(ext, root);
    check_writable(ext);
    if (ext.size() + kNameReserve >= kPathMax) {
        throw make_system_error(ENAMETOOLONG, "crash dump directory path too long");
    }
    Locked lock;
    start_dump_thread_locked();
    crash::prepare_thread();
    const LONG next = g_prefix_index == 0 ? 1 : 0;
    // A drive's root ("C:\") ends in a backslash already; an extended-length path must not
    // have two in a row.
    const std::wstring prefix = ext + (ext.back() == L'\\' ? L"" : L"\\") + L"iocpnative-";
    std::memcpy(g_prefix[next], prefix.c_str(), (prefix.size() + 1) * sizeof(wchar_t));
    g_root_length[next] = root;
    InterlockedExchange(&g_prefix_index, next);
    if (!g_installed) {
        g_previous_filter = SetUnhandledExceptionFilter(on_unhandled_exception);
        g_installed = true;
    }
    g_directory = narrow(abs);
}

void disable_crash_dumps() {
    Locked lock;
    InterlockedExchange(&g_prefix_index, -1);
    g_directory.clear();
    if (!g_installed) return;
    // Put the previous filter back only if ours is still the current one; if another filter
    // replaced ours and chains to it, ours stays in place, disarmed, and passes straight on.
    LPTOP_LEVEL_EXCEPTION_FILTER current = SetUnhandledExceptionFilter(g_previous_filter);
    if (current == on_unhandled_exception) {
        g_installed = false;
    } else {
        SetUnhandledExceptionFilter(current);
    }
}

std::string crash_dump_directory() {
    Locked lock;
    return g_directory;
}

}  // namespace iocpnative

#endif  // _WIN32
