// Crash capture on the core's own worker threads (POSIX): a server whose handler faults, or
// overflows its stack, on a worker thread must still leave a report and die of SIGSEGV. The
// stack overflow case proves the per-thread alternate stack the workers get at start-up:
// without it the kernel has no stack to run the handler on and kills the process silently.
// Each crash runs in a forked child; the parent checks how it died and reads the report.
// (Windows: tests/test_wine_crash.py checks the minidump of the MinGW server under wine.)
#include <dirent.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "backend/backend.hpp"
#include "iocpnative/client.hpp"
#include "iocpnative/crash_dump.hpp"
#include "iocpnative/server.hpp"
#include "test_harness.hpp"

using namespace iocpnative;

namespace {

volatile bool g_stop_recursion = false;  // never set: keeps the recursion from looking infinite

// Recurses until the stack runs out; each frame keeps a buffer alive so it cannot be elided.
__attribute__((noinline)) int recurse(const volatile char* prev) {
    volatile char frame[1024];
    frame[0] = prev != nullptr ? static_cast<char>(prev[0] + 1) : 1;
    if (g_stop_recursion) return frame[0];
    return recurse(frame) + frame[0];
}

class FaultingHandler : public DataHandler {
  public:
    explicit FaultingHandler(bool overflow) : overflow_(overflow) {}
    bool on_data(uint64_t, const char*, size_t, std::string&) override {
        if (overflow_) return recurse(nullptr) != 0;
        trigger_test_crash();
    }

  private:
    bool overflow_;
};

std::string make_temp_dir() {
    char tmpl[] = "/tmp/iocpnative-crash-test-XXXXXX";
    ASSERT_TRUE(mkdtemp(tmpl) != nullptr);
    return tmpl;
}

// In a child: a server on `backend` whose handler faults on the first bytes; one client sends.
[[noreturn]] void crash_a_worker(const std::string& dir, const std::string& backend,
                                 bool overflow) {
    rlimit no_core = {0, 0};
    setrlimit(RLIMIT_CORE, &no_core);
    enable_crash_dumps(dir);
    ServerConfig cfg;
    cfg.port = 0;
    cfg.workers = 2;
    cfg.backend = backend;
    Server srv(cfg, std::make_shared<FaultingHandler>(overflow));
    srv.start();
    Client c("127.0.0.1", srv.port(), 5.0);
    c.send("x", 1);
    std::this_thread::sleep_for(std::chrono::seconds(30));  // the worker's crash ends us first
    std::_Exit(0);
}

std::vector<std::string> reports_in(const std::string& dir) {
    std::vector<std::string> out;
    DIR* d = opendir(dir.c_str());
    ASSERT_TRUE(d != nullptr);
    while (dirent* e = readdir(d)) {
        const std::string name = e->d_name;
        if (name.size() > 6 && name.compare(name.size() - 6, 6, ".crash") == 0) {
            out.push_back(dir + "/" + name);
        }
    }
    closedir(d);
    return out;
}

std::string read_file(const std::string& path) {
    std::ifstream in(path);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

void remove_dir(const std::string& dir) {
    for (const auto& f : reports_in(dir)) ASSERT_EQ(unlink(f.c_str()), 0);
    ASSERT_EQ(rmdir(dir.c_str()), 0);
}

int check_worker_crash(bool overflow) {
    const auto backends = available_backends();
    if (backends.empty()) return testh::kSkip;
    for (const auto& backend : backends) {
        std::printf("  backend %s\n", backend.c_str());
        const std::string dir = make_temp_dir();
        const pid_t pid = fork();
        ASSERT_TRUE(pid >= 0);
        if (pid == 0) crash_a_worker(dir, backend, overflow);
        int status = 0;
        ASSERT_EQ(waitpid(pid, &status, 0), pid);
#ifdef IOCPNATIVE_TEST_SANITIZED
        // The sanitizer's own SIGSEGV handler was installed before ours; we chain to it, and it
        // reports and exits non-zero instead of dying of the signal.
        ASSERT_TRUE(WIFSIGNALED(status) || (WIFEXITED(status) && WEXITSTATUS(status) != 0));
#else
        ASSERT_TRUE(WIFSIGNALED(status));
        ASSERT_EQ(WTERMSIG(status), SIGSEGV);
#endif  // IOCPNATIVE_TEST_SANITIZED
        const auto found = reports_in(dir);
        ASSERT_EQ(found.size(), static_cast<size_t>(1));
        const std::string text = read_file(found[0]);
        ASSERT_TRUE(text.find("signal: SIGSEGV (11)\n") != std::string::npos);
        ASSERT_TRUE(text.find("pid: " + std::to_string(pid) + "\n") != std::string::npos);
        ASSERT_TRUE(text.find("(main thread)") == std::string::npos);  // a worker crashed
        ASSERT_TRUE(text.find("end of report") != std::string::npos);
        remove_dir(dir);
    }
    return testh::kPass;
}

}  // namespace

TEST_CASE(fault_on_worker_thread_is_reported) {
    return check_worker_crash(false);
}

TEST_CASE(stack_overflow_on_worker_thread_is_reported) {
    return check_worker_crash(true);
}

TEST_MAIN()
