// Crash capture on POSIX: a fatal-signal handler writes a text report, then the process dies of
// the same signal it would have died of without us.
//
// Needs: Linux (SA_SIGINFO, SA_ONSTACK, sigaltstack, the gettid syscall: any 2.6+ kernel) and a
// libc with <execinfo.h> (glibc's backtrace() and backtrace_symbols_fd()).
//
// The handler is async-signal-safe (signal-safety(7)): no malloc, no stdio, no locks. It
// formats into stack buffers with its own number formatting and calls only open, mkdir, write,
// close, strlen, memset, sigemptyset, clock_gettime, nanosleep, getpid, syscall(SYS_gettid),
// sigaction and raise. Two calls go beyond that list, as they do in every in-process crash
// reporter that prints a backtrace: backtrace(), whose first call loads libgcc_s with dlopen
// (which mallocs and takes the loader lock; the heap may be the very thing that is corrupt), so
// enable calls it once beforehand and the handler only ever makes the later, allocation-free
// calls; and backtrace_symbols_fd(), which unlike backtrace_symbols() writes straight to the
// descriptor without malloc.
#ifndef _WIN32

#include <execinfo.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>

#include "crash_text.hpp"
#include "crash_thread.hpp"
#include "iocpnative/crash_dump.hpp"
#include "iocpnative/errors.hpp"

namespace iocpnative {

namespace {

struct FatalSignal {
    int number;
    const char* name;
};
constexpr int kSignalCount = 5;
constexpr FatalSignal kSignals[kSignalCount] = {
    {SIGSEGV, "SIGSEGV"}, {SIGBUS, "SIGBUS"},   {SIGFPE, "SIGFPE"},
    {SIGILL, "SIGILL"},   {SIGABRT, "SIGABRT"},
};

// Room after the directory for "/iocpnative-<pid>-<YYYYMMDDTHHMMSSZ>-<n>.crash" and the NUL.
constexpr size_t kNameReserve = 64;
// A report whose name is taken is numbered -2, -3, ... up to this.
constexpr int kMaxReportNumber = 100;

// Written by enable/disable under g_mutex; the handler only reads. g_previous[i] is filled
// before our handler is installed for that signal and is not touched while it is installed.
std::mutex g_mutex;
bool g_installed[kSignalCount] = {};
struct sigaction g_previous[kSignalCount];
std::string g_directory;  // what crash_dump_directory() returns; "" when disarmed
bool g_backtrace_loaded = false;

// The report path prefix "<dir>/iocpnative-" lives in one of two buffers. enable writes the one
// the handler is not pointed at and then publishes its index, so re-targeting never changes a
// path under a crashing thread that is copying it. -1 means disarmed: the handler writes nothing
// and only passes the signal on.
char g_prefix[2][PATH_MAX];
std::atomic<int> g_prefix_index{-1};

// The thread (tid) writing the report, 0 while none is. A second thread that crashes meanwhile
// waits for the first to finish instead of killing the process under it.
std::atomic<long> g_reporter{0};
std::atomic<bool> g_report_done{false};

static_assert(std::atomic<int>::is_always_lock_free, "the handler needs lock-free atomics");
static_assert(std::atomic<long>::is_always_lock_free, "the handler needs lock-free atomics");
static_assert(std::atomic<bool>::is_always_lock_free, "the handler needs lock-free atomics");

long current_tid() noexcept {
    return syscall(SYS_gettid);
}

const char* signal_name(int sig) noexcept {
    for (const FatalSignal& s : kSignals) {
        if (s.number == sig) return s.name;
    }
    return "signal";
}

// The symbolic name of si_code (see sigaction(2)), "" when we do not know it.
const char* code_name(int sig, int code) noexcept {
    switch (code) {
        case SI_USER:
            return "SI_USER";
        case SI_QUEUE:
            return "SI_QUEUE";
        case SI_TKILL:
            return "SI_TKILL";
        case SI_KERNEL:
            return "SI_KERNEL";
        default:
            break;
    }
    if (sig == SIGSEGV) {
        if (code == SEGV_MAPERR) return "SEGV_MAPERR (address not mapped)";
        if (code == SEGV_ACCERR) return "SEGV_ACCERR (no permission for the access)";
    } else if (sig == SIGBUS) {
        if (code == BUS_ADRALN) return "BUS_ADRALN (misaligned address)";
        if (code == BUS_ADRERR) return "BUS_ADRERR (no such physical address)";
        if (code == BUS_OBJERR) return "BUS_OBJERR (object-specific error)";
    } else if (sig == SIGFPE) {
        if (code == FPE_INTDIV) return "FPE_INTDIV (integer divide by zero)";
        if (code == FPE_INTOVF) return "FPE_INTOVF (integer overflow)";
        if (code == FPE_FLTDIV) return "FPE_FLTDIV (floating-point divide by zero)";
        if (code == FPE_FLTINV) return "FPE_FLTINV (invalid floating-point operation)";
    } else if (sig == SIGILL) {
        if (code == ILL_ILLOPC) return "ILL_ILLOPC (illegal opcode)";
        if (code == ILL_ILLOPN) return "ILL_ILLOPN (illegal operand)";
        if (code == ILL_PRVOPC) return "ILL_PRVOPC (privileged opcode)";
    }
    return "";
}

uintptr_t instruction_pointer(const void* uctx) noexcept {
    if (uctx == nullptr) return 0;
    const auto* uc = static_cast<const ucontext_t*>(uctx);
#if defined(__x86_64__)
    return static_cast<uintptr_t>(uc->uc_mcontext.gregs[REG_RIP]);
#elif defined(__aarch64__)
    return static_cast<uintptr_t>(uc->uc_mcontext.pc);
#else
    (void)uc;
    return 0;
#endif  // instruction pointer by architecture
}

void write_all(int fd, const char* data, size_t len) noexcept {
    while (len > 0) {
        const ssize_t n = write(fd, data, len);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return;  // a full disk: keep what was written and carry on dying
        data += n;
        len -= static_cast<size_t>(n);
    }
}

// mkdir -p of the directory part of `path` (all before its last '/'), in place: each '/' is cut
// to a NUL for one mkdir(2) and put back. A component that exists fails with EEXIST, harmlessly.
void make_parent_directories(char* path) noexcept {
    size_t last = 0;
    for (size_t i = 1; path[i] != '\0'; ++i) {
        if (path[i] == '/') last = i;
    }
    for (size_t i = 1; i <= last; ++i) {
        if (path[i] != '/') continue;
        path[i] = '\0';
        mkdir(path, 0777);
        path[i] = '/';
    }
}

// Opens "<prefix><pid>-<timestamp>.crash" in `path` and returns the descriptor, or -1 with
// errno set and `path` naming the file that could not be created. The directory is created
// again if it has gone since enable (a /tmp cleaner removes an old empty one). A name already
// taken (a pid reused within the same second, as in a restarted container's PID namespace)
// gets "-2", "-3", ... before ".crash" instead of losing the report.
int open_report(int prefix_index, const crash_text::Civil& now, char* path, size_t cap) noexcept {
    bool directory_made = false;
    for (int number = 1; number <= kMaxReportNumber;) {
        crash_text::Text p(path, cap);
        p.put(g_prefix[prefix_index]);
        p.put_report_name(static_cast<int64_t>(getpid()), now, number, ".crash");
        if (p.truncated()) {
            errno = ENAMETOOLONG;
            return -1;
        }
        const int fd = open(p.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
        if (fd >= 0) return fd;
        if (errno == EEXIST) {
            ++number;
        } else if (errno == ENOENT && !directory_made) {
            make_parent_directories(path);
            directory_made = true;
        } else {
            return -1;
        }
    }
    return -1;
}

// The report file, or -1 after one line on stderr saying which file could not be created and
// why (errno by number: strerror is not async-signal-safe), so that a lost report is not silent.
int create_report_file(int prefix_index, const crash_text::Civil& now) noexcept {
    char path[PATH_MAX];
    const int fd = open_report(prefix_index, now, path, sizeof path);
    if (fd >= 0) return fd;
    const int err = errno;
    // stderr may be a pipe nobody reads any more: the write would raise SIGPIPE, and its
    // default action would end the process with that signal instead of the one we pass on.
    // An ignored SIGPIPE is discarded, so ignore it for these writes only.
    struct sigaction ignore_pipe;
    struct sigaction previous_pipe;
    std::memset(&ignore_pipe, 0, sizeof ignore_pipe);
    ignore_pipe.sa_handler = SIG_IGN;
    sigemptyset(&ignore_pipe.sa_mask);
    const bool pipe_ignored = sigaction(SIGPIPE, &ignore_pipe, &previous_pipe) == 0;
    static const char kLead[] = "iocpnative: no crash report written: cannot create ";
    write_all(STDERR_FILENO, kLead, sizeof kLead - 1);
    write_all(STDERR_FILENO, path, std::strlen(path));
    char tail[32];
    crash_text::Text t(tail, sizeof tail);
    t.put(" (errno ");
    t.put_dec(err);
    t.put(")\n");
    write_all(STDERR_FILENO, t.data(), t.size());
    if (pipe_ignored) sigaction(SIGPIPE, &previous_pipe, nullptr);
    return -1;
}

void write_report(int sig, const siginfo_t* info, const void* uctx, long tid) noexcept {
    const int prefix_index = g_prefix_index.load(std::memory_order_acquire);
    if (prefix_index < 0) return;
    struct timespec ts = {};
    clock_gettime(CLOCK_REALTIME, &ts);
    const crash_text::Civil now = crash_text::to_civil(static_cast<int64_t>(ts.tv_sec));
    const int fd = create_report_file(prefix_index, now);
    if (fd < 0) return;  // nowhere to write: the process still dies of the signal below

    char buf[2048];
    crash_text::Text t(buf, sizeof buf);
    t.put("iocpnative crash report\nversion: " IOCPNATIVE_VERSION "\nsignal: ");
    t.put(signal_name(sig));
    t.put(" (");
    t.put_dec(sig);
    t.put(")\nsi_code: ");
    const int code = info != nullptr ? info->si_code : 0;
    t.put_dec(code);
    t.put(" ");
    t.put(code_name(sig, code));
    if (info != nullptr && code > 0) {
        t.put("\nfault address: ");
        t.put_hex(reinterpret_cast<uintptr_t>(info->si_addr));
    } else if (info != nullptr) {
        // Sent, not caused: kill(2), raise(3), abort(3). si_addr shares storage with si_pid.
        t.put("\nsent by pid: ");
        t.put_dec(static_cast<int64_t>(info->si_pid));
    }
    if (const uintptr_t ip = instruction_pointer(uctx); ip != 0) {
        t.put("\ninstruction pointer: ");
        t.put_hex(ip);
    }
    t.put("\npid: ");
    t.put_dec(static_cast<int64_t>(getpid()));
    t.put("\nthread id: ");
    t.put_dec(tid);
    if (tid == static_cast<long>(getpid())) t.put(" (main thread)");
    t.put("\ntime: ");
    t.put_iso_time(now);
    t.put(
        "\nbacktrace (innermost first; the first frames are this handler and the signal "
        "trampoline; module(+offset) frames resolve with addr2line -e module offset):\n");
    write_all(fd, t.data(), t.size());

    void* frames[64];
    const int n = backtrace(frames, 64);
    backtrace_symbols_fd(frames, n, fd);
    static const char kEnd[] = "end of report\n";
    write_all(fd, kEnd, sizeof kEnd - 1);
    close(fd);
}

// Waits (bounded) for the thread that is writing a report, so that its process-ending re-raise
// comes after the report is complete.
void wait_for_reporter() noexcept {
    struct timespec tick = {0, 10 * 1000 * 1000};
    for (int i = 0; i < 500 && !g_report_done.load(std::memory_order_acquire); ++i) {
        nanosleep(&tick, nullptr);
    }
}

void restore_previous_handlers() noexcept {
    for (int i = 0; i < kSignalCount; ++i) {
        if (g_installed[i]) sigaction(kSignals[i].number, &g_previous[i], nullptr);
    }
}

void on_fatal_signal(int sig, siginfo_t* info, void* uctx) {
    const int saved_errno = errno;
    const long tid = current_tid();
    long expected = 0;
    if (g_reporter.compare_exchange_strong(expected, tid, std::memory_order_acq_rel)) {
        write_report(sig, info, uctx, tid);
        g_report_done.store(true, std::memory_order_release);
    } else if (expected != tid) {
        wait_for_reporter();
    }  // else this thread faulted inside its own report: go straight to the way out

    // Pass the signal on exactly as if we had never been installed: put the previous handlers
    // back (Python's faulthandler, a sanitizer, or SIG_DFL), then make the same signal arrive
    // again. A fault the kernel raised (si_code > 0) arrives again by itself: returning re-runs
    // the faulting instruction, so the previous handler sees the genuine siginfo and context,
    // and with SIG_DFL the core dump shows the faulting thread as it was, not this handler. A
    // sent signal (kill, raise, abort: si_code <= 0) is sent again; it stays pending until we
    // return, because a handler runs with its own signal blocked.
    restore_previous_handlers();
    if (info == nullptr || info->si_code <= 0) raise(sig);
    errno = saved_errno;
}

bool is_our_handler(const struct sigaction& sa) noexcept {
    return (sa.sa_flags & SA_SIGINFO) != 0 && sa.sa_sigaction == on_fatal_signal;
}

// Installs the handler for every fatal signal that does not have it yet. On failure the
// signals installed by this call are restored and SystemError is thrown.
void install_locked() {
    struct sigaction sa;
    std::memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_fatal_signal;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;  // on the thread's alternate stack when it has one
    sigemptyset(&sa.sa_mask);
    bool now_installed[kSignalCount] = {};
    for (int i = 0; i < kSignalCount; ++i) {
        if (g_installed[i]) continue;
        const int sig = kSignals[i].number;
        // Read the previous action first, then install: the handler must never run with a
        // g_previous entry that is still being written.
        if (sigaction(sig, nullptr, &g_previous[i]) != 0 || sigaction(sig, &sa, nullptr) != 0) {
            const int err = errno;
            for (int j = 0; j < i; ++j) {
                if (!now_installed[j]) continue;
                sigaction(kSignals[j].number, &g_previous[j], nullptr);
                g_installed[j] = false;
            }
            throw make_system_error(err, std::string("sigaction(") + kSignals[i].name + ")");
        }
        g_installed[i] = true;
        now_installed[i] = true;
    }
}

// mkdir -p: creates each missing component of `dir`; SystemError (ENOTDIR, EACCES, ...) when a
// component cannot be created or the result is not a directory.
void make_directories(const std::string& dir) {
    for (size_t pos = 0; pos != std::string::npos;) {
        pos = dir.find('/', pos + 1);
        const std::string part = dir.substr(0, pos);
        if (mkdir(part.c_str(), 0777) != 0 && errno != EEXIST) {
            throw make_system_error(errno, "cannot create crash dump directory " + part);
        }
    }
    struct stat st;
    if (stat(dir.c_str(), &st) != 0) {
        throw make_system_error(errno, "cannot use crash dump directory " + dir);
    }
    if (!S_ISDIR(st.st_mode)) {
        throw make_system_error(ENOTDIR, "crash dump path is not a directory: " + dir);
    }
}

// Creates `directory` if needed and returns its canonical absolute path, checked writable.
std::string prepare_directory(const std::string& directory) {
    if (directory.empty()) throw std::invalid_argument("crash dump directory must not be empty");
    make_directories(directory);
    char* resolved = realpath(directory.c_str(), nullptr);
    if (resolved == nullptr) {
        throw make_system_error(errno, "cannot resolve crash dump directory " + directory);
    }
    std::string abs(resolved);
    std::free(resolved);
    if (access(abs.c_str(), W_OK | X_OK) != 0) {
        throw make_system_error(errno, "crash dump directory is not writable: " + abs);
    }
    if (abs.size() + kNameReserve >= PATH_MAX) {
        throw make_system_error(ENAMETOOLONG, "crash dump directory path too long: " + abs);
    }
    return abs;
}

// The thread's alternate signal stack, owned by a thread_local so that it is unmapped when the
// thread exits. A guard page below it turns an overflow of the handler itself into a fault
// instead of silent corruption of whatever lies below.
class AltStack {
  public:
    AltStack() = default;
    AltStack(const AltStack&) = delete;
    AltStack& operator=(const AltStack&) = delete;
    ~AltStack() { release(); }

    void ensure() noexcept {
        if (map_ != nullptr) return;
        stack_t current;
        if (sigaltstack(nullptr, &current) != 0) return;
        if ((current.ss_flags & SS_DISABLE) == 0) return;  // the thread has one already
        const long page_size = sysconf(_SC_PAGESIZE);
        const size_t page = page_size > 0 ? static_cast<size_t>(page_size) : 4096;
        // 64 KiB: backtrace() unwinds on it, and SIGSTKSZ (a run-time value on newer glibc,
        // large with AVX-512/AMX state) only covers the kernel's signal frame.
        const size_t want = std::max<size_t>(64 * 1024, 4 * static_cast<size_t>(SIGSTKSZ));
        const size_t size = (want + page - 1) / page * page;
        void* map = mmap(nullptr, size + page, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
        if (map == MAP_FAILED) return;
        if (mprotect(map, page, PROT_NONE) != 0) {
            munmap(map, size + page);
            return;
        }
        stack_t ss = {};
        ss.ss_sp = static_cast<char*>(map) + page;
        ss.ss_size = size;
        ss.ss_flags = 0;
        if (sigaltstack(&ss, nullptr) != 0) {
            munmap(map, size + page);
            return;
        }
        map_ = map;
        map_size_ = size + page;
        stack_ = ss.ss_sp;
    }

  private:
    void release() noexcept {
        if (map_ == nullptr) return;
        stack_t current;
        if (sigaltstack(nullptr, &current) == 0 && current.ss_sp == stack_ &&
            (current.ss_flags & SS_ONSTACK) == 0) {
            stack_t off = {};
            off.ss_flags = SS_DISABLE;
            if (sigaltstack(&off, nullptr) != 0) return;  // still in use: leak rather than fault
        }
        munmap(map_, map_size_);
        map_ = nullptr;
    }

    void* map_ = nullptr;
    size_t map_size_ = 0;
    void* stack_ = nullptr;
};

thread_local AltStack t_alt_stack;

}  // namespace

void crash::prepare_thread() noexcept {
    t_alt_stack.ensure();
}

void enable_crash_dumps(const std::string& directory) {
    const std::string abs = prepare_directory(directory);
    std::lock_guard<std::mutex> lock(g_mutex);
    if (!g_backtrace_loaded) {
        // The first backtrace() loads libgcc_s (dlopen: malloc, loader lock). Do it now, in a
        // sane process, so that the handler's call is allocation-free.
        void* frame = nullptr;
        backtrace(&frame, 1);
        g_backtrace_loaded = true;
    }
    crash::prepare_thread();  // the enabling thread (usually the main thread)

    const int next = g_prefix_index.load(std::memory_order_relaxed) == 0 ? 1 : 0;
    const std::string prefix = abs + "/iocpnative-";
    std::memcpy(g_prefix[next], prefix.c_str(), prefix.size() + 1);
    install_locked();
    g_prefix_index.store(next, std::memory_order_release);
    g_directory = abs;
}

void disable_crash_dumps() {
    std::lock_guard<std::mutex> lock(g_mutex);
    g_prefix_index.store(-1, std::memory_order_release);
    g_directory.clear();
    for (int i = 0; i < kSignalCount; ++i) {
        if (!g_installed[i]) continue;
        struct sigaction current;
        if (sigaction(kSignals[i].number, nullptr, &current) != 0) continue;
        // Someone installed a handler over ours (faulthandler enabled later, say) and may chain
        // to us: leave ours in place, disarmed, so the chain still reaches the handler before us.
        if (!is_our_handler(current)) continue;
        if (sigaction(kSignals[i].number, &g_previous[i], nullptr) != 0) {
            throw make_system_error(errno, std::string("sigaction(") + kSignals[i].name + ")");
        }
        g_installed[i] = false;
    }
}

std::string crash_dump_directory() {
    std::lock_guard<std::mutex> lock(g_mutex);
    return g_directory;
}

}  // namespace iocpnative

#endif  // !_WIN32
