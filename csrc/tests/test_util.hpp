// Helpers shared by the C++ server tests: one body run once per backend, deterministic payloads,
// and the "everything freed" check after stop().
#pragma once

#include <cstdio>
#include <random>
#include <stdexcept>
#include <string>

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

inline void expect_pool_freed(const iocpnative::Server& srv) {
    const iocpnative::ServerStats st = srv.stats();
    ASSERT_EQ(st.pool_in_use, 0);
    ASSERT_EQ(st.pool_allocated, 0);
    ASSERT_EQ(st.active_connections, 0);
}

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
#endif  // __linux__

}  // namespace testutil
