// The load generator: its histogram's bucket arithmetic, and a short run against our own server
// on every backend (every echoed byte verified, no errors, the server's pool freed after), plus
// a refused port counted as connect failures rather than thrown.
#include <cstdint>
#include <string>

#include "backend/backend.hpp"
#include "client/loadgen.hpp"
#include "iocpnative/server.hpp"
#include "test_harness.hpp"

using namespace iocpnative;

TEST_CASE(histogram_buckets) {
    // Small values are exact; every value lies at or below its bucket's upper edge and above the
    // previous bucket's, with a relative error below 1 / kSub.
    for (uint64_t v = 0; v < LatencyHistogram::kSub; ++v) {
        ASSERT_EQ(LatencyHistogram::upper_edge(LatencyHistogram::index(v)), v);
    }
    for (uint64_t v = LatencyHistogram::kSub; v < (uint64_t{1} << 40); v = v * 3 / 2 + 7) {
        const unsigned i = LatencyHistogram::index(v);
        ASSERT_LE(v, LatencyHistogram::upper_edge(i));
        ASSERT_GT(v, LatencyHistogram::upper_edge(i - 1));
        const double err =
            static_cast<double>(LatencyHistogram::upper_edge(i) - v) / static_cast<double>(v);
        ASSERT_TRUE(err < 1.0 / LatencyHistogram::kSub);
    }
    ASSERT_EQ(LatencyHistogram::index(~uint64_t{0}), LatencyHistogram::kBuckets - 1);
    return testh::kPass;
}

TEST_CASE(histogram_quantiles) {
    LatencyHistogram h;
    ASSERT_EQ(h.quantile(0.5), uint64_t{0});
    for (uint64_t v = 1; v <= 1000; ++v) h.add(v * 1000);  // 1 us .. 1 ms
    ASSERT_EQ(h.count(), uint64_t{1000});
    ASSERT_EQ(h.max(), uint64_t{1000000});
    const auto close_to = [](uint64_t got, double want) {
        return static_cast<double>(got) >= want && static_cast<double>(got) <= want * 1.01;
    };
    ASSERT_TRUE(close_to(h.quantile(0.5), 500000));
    ASSERT_TRUE(close_to(h.quantile(0.99), 990000));
    ASSERT_EQ(h.quantile(1.0), uint64_t{1000000});
    LatencyHistogram other;
    other.add(5000000);
    h.merge(other);
    ASSERT_EQ(h.count(), uint64_t{1001});
    ASSERT_EQ(h.max(), uint64_t{5000000});
    return testh::kPass;
}

TEST_CASE(load_against_own_server) {
    const auto names = available_backends();
    if (names.empty()) return testh::kSkip;
    for (const auto& backend : names) {
        std::printf("  backend %s\n", backend.c_str());
        ServerConfig scfg;
        scfg.port = 0;
        scfg.workers = 2;
        scfg.backend = backend;
        scfg.buffer_size = 1000;  // messages span several server buffers
        Server srv(scfg);
        srv.start();
        LoadConfig cfg;
        cfg.port = srv.port();
        cfg.connections = 12;
        cfg.size = 2500;
        cfg.threads = 3;
        cfg.pipeline = 2;
        cfg.duration_s = 0.3;
        cfg.warmup_s = 0.1;
        int calls = 0;
        const LoadResult r = run_load(cfg, [&](const LoadProgress&) { return ++calls > 0; });
        srv.stop();
        ASSERT_EQ(r.errors, uint64_t{0});
        ASSERT_EQ(r.connections_open, 12);
        ASSERT_GT(r.round_trips, uint64_t{0});
        ASSERT_TRUE(r.p50_us > 0 && r.p50_us <= r.p99_us && r.p99_us <= r.max_us);
        ASSERT_TRUE(r.first_error.empty());
        const ServerStats st = srv.stats();
        ASSERT_GE(st.bytes_sent, static_cast<int64_t>(r.round_trips * cfg.size));
        ASSERT_EQ(st.pool_in_use, 0);
        ASSERT_EQ(st.pool_allocated, 0);
    }
    return testh::kPass;
}

TEST_CASE(refused_port_is_counted) {
    ServerConfig scfg;
    scfg.port = 0;
    scfg.workers = 1;
    Server srv(scfg);
    srv.start();
    const uint16_t port = srv.port();
    srv.stop();  // nothing listens on `port` now
    LoadConfig cfg;
    cfg.port = port;
    cfg.connections = 4;
    cfg.duration_s = 0.1;
    cfg.warmup_s = 0.0;
    const LoadResult r = run_load(cfg);
    ASSERT_EQ(r.error_counts[static_cast<size_t>(LoadError::ConnectFailed)], uint64_t{4});
    ASSERT_EQ(r.round_trips, uint64_t{0});
    ASSERT_TRUE(r.first_error.find("connect_failed") == 0);
    return testh::kPass;
}

TEST_MAIN()
