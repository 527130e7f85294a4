// iocpnative-server: the seed's echo server, built from the core. The flags of
// `python -m iocpnative server` but --handler (no Python here), plus --run-seconds for tests;
// --idle-timeout 0 means never, as leaving it out does (Python refuses 0). Stops on Ctrl-C or
// SIGTERM (Windows: any console control event) or when the run limit passes, then prints its final
// stats in the Python CLI's format ("final stats: active_connections=0 ... pool_in_use=0
// pool_allocated=0 ...") and exits 0. --crash-dump-dir DIR writes a report of a native crash
// there (Windows: a minidump); --test-crash crashes on purpose right after start-up, to check it.
#include <chrono>
#include <cstdio>
#include <exception>
#include <stdexcept>
#include <string>

#include "iocpnative/crash_dump.hpp"
#include "iocpnative/errors.hpp"
#include "iocpnative/server.hpp"
#include "options.hpp"

#ifdef _WIN32
#include <condition_variable>
#include <mutex>

#include "iocpnative/platform.hpp"
#else
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <time.h>
#endif  // _WIN32

namespace {

using iocpnative::ServerConfig;
using iocpnative::ServerStats;

constexpr double kStopTimeoutS = 10.0;

const char kUsage[] =
    "usage: iocpnative-server [--host HOST] [--port PORT] [--workers N]\n"
    "                         [--backend {auto,iocp,io_uring,epoll}] [--buffer-size BYTES]\n"
    "                         [--max-connections N] [--idle-timeout SECONDS] [-v]\n"
    "                         [--batch-wait-us MICROSECONDS]\n"
    "                         [--run-seconds SECONDS] [--crash-dump-dir DIR] [--test-crash]\n"
    "Echo server; stops on Ctrl-C/SIGTERM or after --run-seconds, then prints final stats.\n";

struct Settings {
    ServerConfig cfg;
    double run_seconds = 0.0;  // 0: until a signal
    std::string crash_dump_dir;
    bool test_crash = false;
    bool help = false;
};

Settings parse(int argc, char** argv) {
    Settings s;
    iocpnative::tools::Options opt(argc, argv);
    while (opt.next()) {
        const std::string& f = opt.flag();
        if (f == "-h" || f == "--help") {
            s.help = true;
        } else if (f == "--host") {
            s.cfg.host = opt.text();
        } else if (f == "--port") {
            s.cfg.port = static_cast<uint16_t>(opt.integer(0, 65535));
        } else if (f == "--workers") {
            s.cfg.workers = static_cast<int>(opt.integer(1, iocpnative::kMaxWorkers));
        } else if (f == "--backend") {
            s.cfg.backend = opt.text();
        } else if (f == "--buffer-size") {
            s.cfg.buffer_size = static_cast<size_t>(opt.integer(1, 64LL << 20));
        } else if (f == "--max-connections") {
            s.cfg.max_connections = static_cast<size_t>(opt.integer(1, 1LL << 40));
        } else if (f == "--idle-timeout") {
            s.cfg.idle_timeout = opt.number(0.0);
        } else if (f == "--batch-wait-us") {
            s.cfg.batch_wait_us = static_cast<int>(opt.integer(0, iocpnative::kMaxBatchWaitUs));
        } else if (f == "-v" || f == "--verbose") {
            s.cfg.verbose = true;
        } else if (f == "--run-seconds") {
            s.run_seconds = opt.number(0.0);
        } else if (f == "--crash-dump-dir") {
            s.crash_dump_dir = opt.text();
        } else if (f == "--test-crash") {
            s.test_crash = true;
        } else {
            opt.unknown();
        }
    }
    iocpnative::validate(s.cfg);
    return s;
}

#ifdef _WIN32
// Console control events arrive on a thread the system creates; main() waits for the flag.
std::mutex g_mu;
std::condition_variable g_cv;
bool g_stop = false;
bool g_done = false;

BOOL WINAPI on_console_event(DWORD type) {
    switch (type) {
        case CTRL_C_EVENT:
        case CTRL_BREAK_EVENT:
        case CTRL_CLOSE_EVENT:
        case CTRL_SHUTDOWN_EVENT: {
            std::unique_lock<std::mutex> g(g_mu);
            g_stop = true;
            g_cv.notify_all();
            // The process ends when this returns for a close/shutdown event: let main() finish
            // (stop the server, print the stats) first, within the system's grace period.
            if (type == CTRL_CLOSE_EVENT || type == CTRL_SHUTDOWN_EVENT) {
                g_cv.wait_for(g, std::chrono::seconds(4), [] { return g_done; });
            }
            return TRUE;
        }
        default:
            return FALSE;
    }
}

void prepare_signals() {
    if (!::SetConsoleCtrlHandler(on_console_event, TRUE)) {
        throw iocpnative::make_system_error(
            iocpnative::errno_from_native(static_cast<int>(::GetLastError())),
            "SetConsoleCtrlHandler");
    }
}

// Returns true when interrupted, false when the run limit passed.
bool wait_for_stop(double run_seconds) {
    std::unique_lock<std::mutex> g(g_mu);
    if (run_seconds <= 0) {
        g_cv.wait(g, [] { return g_stop; });
        return true;
    }
    return g_cv.wait_for(g, std::chrono::duration<double>(run_seconds), [] { return g_stop; });
}

void finished() {
    std::lock_guard<std::mutex> g(g_mu);
    g_done = true;
    g_cv.notify_all();
}
#else
sigset_t g_stop_signals;

// Blocked before any worker thread starts, so that every thread inherits the mask and the
// signals stay pending until main() takes them with sigwait/sigtimedwait.
void prepare_signals() {
    sigemptyset(&g_stop_signals);
    sigaddset(&g_stop_signals, SIGINT);
    sigaddset(&g_stop_signals, SIGTERM);
    const int err = pthread_sigmask(SIG_BLOCK, &g_stop_signals, nullptr);
    if (err != 0) throw iocpnative::make_system_error(err, "pthread_sigmask");
}

bool wait_for_stop(double run_seconds) {
    if (run_seconds <= 0) {
        int sig = 0;
        const int err = sigwait(&g_stop_signals, &sig);
        if (err != 0) throw iocpnative::make_system_error(err, "sigwait");
        return true;
    }
    using clock = std::chrono::steady_clock;
    const auto deadline = clock::now() + std::chrono::duration_cast<clock::duration>(
                                             std::chrono::duration<double>(run_seconds));
    for (;;) {
        const auto left = deadline - clock::now();
        if (left <= clock::duration::zero()) return false;
        const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(left).count();
        timespec ts;
        ts.tv_sec = static_cast<time_t>(ns / 1000000000);
        ts.tv_nsec = static_cast<long>(ns % 1000000000);
        if (sigtimedwait(&g_stop_signals, nullptr, &ts) >= 0) return true;
        if (errno != EAGAIN && errno != EINTR) {
            throw iocpnative::make_system_error(errno, "sigtimedwait");
        }
    }
}

void finished() {}
#endif  // _WIN32

void print_stats(const ServerStats& st) {
    std::printf(
        "final stats: active_connections=%lld total_connections=%lld rejected_connections=%lld "
        "bytes_received=%lld bytes_sent=%lld pool_in_use=%lld pool_allocated=%lld "
        "handler_errors=%lld recv_buffers=%lld\n",
        static_cast<long long>(st.active_connections), static_cast<long long>(st.total_connections),
        static_cast<long long>(st.rejected_connections), static_cast<long long>(st.bytes_received),
        static_cast<long long>(st.bytes_sent), static_cast<long long>(st.pool_in_use),
        static_cast<long long>(st.pool_allocated), static_cast<long long>(st.handler_errors),
        static_cast<long long>(st.recv_buffers));
    std::fflush(stdout);
}

int run(const Settings& s) {
    if (!s.crash_dump_dir.empty()) {
        iocpnative::enable_crash_dumps(s.crash_dump_dir);
        std::printf("crash dumps go to %s\n", iocpnative::crash_dump_directory().c_str());
    }
    prepare_signals();
    iocpnative::Server srv(s.cfg);
    srv.start();
    std::printf(
        "iocpnative-server %s listening on %s:%u (backend %s, %d workers); Ctrl-C to stop\n",
        IOCPNATIVE_VERSION, srv.host().c_str(), static_cast<unsigned>(srv.port()),
        srv.backend().c_str(), srv.workers());
    std::fflush(stdout);
    if (s.test_crash) iocpnative::trigger_test_crash();  // with the workers running
    const bool interrupted = wait_for_stop(s.run_seconds);
    std::printf("stopping: %s\n", interrupted ? "interrupted" : "run limit reached");
    std::fflush(stdout);
    srv.stop(kStopTimeoutS);
    print_stats(srv.stats());
    finished();
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    return iocpnative::tools::tool_main<Settings>("iocpnative-server", kUsage, argc, argv, parse,
                                                  run);
}
