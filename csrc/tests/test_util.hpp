// Helpers shared by the C++ server tests: one body run once per backend, deterministic payloads,
// and the "everything freed" check after stop().
#pragma once

#include <cstdio>
#include <random>
#include <string>

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

}  // namespace testutil
