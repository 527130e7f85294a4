// Helpers shared by the C++ server tests: one body run once per backend, deterministic payloads,
// and the "everything freed" check after stop().
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <functional>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>

#ifdef __linux__
#include <dirent.h>

#include <fstream>
#endif  // __linux__

#include "backend/backend.hpp"
#include "iocpnative/server.hpp"
#include "test_harness.hpp"

namespace testutil {

inline std::string random_bytes(size_t n, unsigned seed) {
    std::mt19937 rng(seed);
    std::string s(n, '\0');
    for (auto& ch : s) ch = static_cast<char>(rng() & 0xff);
    return s;
}

// Port 0, two workers, the given backend.
inline iocpnative::ServerConfig config_for(const std::string& backend) {
    iocpnative::ServerConfig cfg;
    cfg.port = 0;
    cfg.workers = 2;
    cfg.backend = backend;
    return cfg;
}

inline iocpnative::ServerConfig config_for(const std::string& backend, size_t buffer_size) {
    iocpnative::ServerConfig cfg = config_for(backend);
    cfg.buffer_size = buffer_size;
    return cfg;
}

// Runs fn(name) for every backend available here (less IOCPNATIVE_TEST_SKIP_BACKENDS).
template <class Fn>
int for_each_backend(Fn&& fn) {
    const auto names = testh::backends_under_test(iocpnative::available_backends());
    if (names.empty()) return testh::kSkip;
    for (const auto& name : names) {
        std::printf("  backend %s\n", name.c_str());
        fn(name);
    }
    return testh::kPass;
}

// Polls `done` every 10 ms until it holds (true) or `seconds` have gone by (false): tests wait
// for a condition against a deadline instead of sleeping a fixed time.
inline bool wait_until(const std::function<bool()>& done, double seconds) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
    while (!done()) {
        if (std::chrono::steady_clock::now() > deadline) return false;
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return true;
}

inline void expect_pool_freed(const iocpnative::Server& srv) {
    const iocpnative::ServerStats st = srv.stats();
    ASSERT_EQ(st.pool_in_use, 0);
    ASSERT_EQ(st.pool_allocated, 0);
    ASSERT_EQ(st.active_connections, 0);
}

// A handler that blocks in on_data until release() (20 s at most, so that a failing test cannot
// hang), after saying it has started: for stop() while a handler runs.
class Blocker final : public iocpnative::DataHandler {
  public:
    bool on_data(uint64_t, const char* data, size_t len, std::string& out) override {
        {
            std::unique_lock<std::mutex> g(mu_);
            entered_ = true;
            cv_.notify_all();
            cv_.wait_for(g, std::chrono::seconds(20), [&] { return released_; });
        }
        out.assign(data, len);
        return true;
    }
    void wait_entered() {
        std::unique_lock<std::mutex> g(mu_);
        ASSERT_TRUE(cv_.wait_for(g, std::chrono::seconds(20), [&] { return entered_; }));
    }
    void release() {
        std::lock_guard<std::mutex> g(mu_);
        released_ = true;
        cv_.notify_all();
    }

  private:
    std::mutex mu_;
    std::condition_variable cv_;
    bool entered_ = false;
    bool released_ = false;
};

#ifdef __linux__
// Context switches of every thread of this process so far (Linux /proc).
inline long long context_switches() {
    long long total = 0;
    DIR* d = ::opendir("/proc/self/task");
    if (d == nullptr) throw std::runtime_error("cannot open /proc/self/task");
    while (const dirent* e = ::readdir(d)) {
        if (e->d_name[0] == '.') continue;
        std::ifstream f(std::string("/proc/self/task/") + e->d_name + "/status");
        std::string line;
        while (std::getline(f, line)) {
            if (line.find("ctxt_switches:") != std::string::npos) {
                total += std::stoll(line.substr(line.find(':') + 1));
            }
        }
    }
    ::closedir(d);
    return total;
}

// Context switches of this process in 300 ms of quiet, after 50 ms for the last completions: a
// sleeping server makes only a few.
inline long long idle_context_switches() {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    const long long before = context_switches();
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    const long long switches = context_switches() - before;
    std::printf("  %lld context switches in 300 ms\n", switches);
    return switches;
}
#endif  // __linux__

}  // namespace testutil
