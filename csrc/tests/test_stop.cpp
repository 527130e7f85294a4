// stop() at its edges, once per backend available here: several threads calling stop() at once
// (only one may join the workers), and timeouts so large that converting them to clock ticks or
// milliseconds would overflow (they mean "never").
#include <atomic>
#include <chrono>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "backend/backend.hpp"
#include "iocpnative/client.hpp"
#include "iocpnative/server.hpp"
#include "test_harness.hpp"
#include "test_util.hpp"

using namespace iocpnative;
using testutil::config_for;
using testutil::expect_pool_freed;
using testutil::for_each_backend;
using testutil::random_bytes;

TEST_CASE(concurrent_stops_join_once) {
    return for_each_backend([](const std::string& backend) {
        for (int round = 0; round < 50; ++round) {
            Server srv(config_for(backend));
            srv.start();
            Client cli("127.0.0.1", srv.port(), 5.0);
            char back[4];
            cli.request("stop", 4, back);
            std::atomic<int> ready{0};
            std::vector<std::thread> stoppers;
            for (int i = 0; i < 3; ++i) {
                stoppers.emplace_back([&] {
                    ++ready;
                    while (ready.load() < 3) std::this_thread::yield();
                    srv.stop(5.0);
                });
            }
            for (auto& t : stoppers) t.join();
            const ServerStats st = srv.stats();
            ASSERT_TRUE(!srv.running());
            ASSERT_EQ(st.pool_in_use, 0);
            ASSERT_EQ(st.pool_allocated, 0);
            ASSERT_EQ(st.active_connections, 0);
        }
    });
}

TEST_CASE(huge_timeouts_mean_never) {
    return for_each_backend([](const std::string& backend) {
        ServerConfig cfg = config_for(backend);
        cfg.idle_timeout = 1e300;
        Server srv(cfg);
        srv.start();
        Client cli("127.0.0.1", srv.port(), 1e300);
        char back[5];
        cli.request("hello", 5, back);
        ASSERT_TRUE(std::memcmp(back, "hello", 5) == 0);
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
        cli.request("again", 5, back);  // an overflowed idle timeout would have closed it
        ASSERT_TRUE(std::memcmp(back, "again", 5) == 0);
        ASSERT_EQ(srv.stats().active_connections, 1);
        const auto t0 = std::chrono::steady_clock::now();
        srv.stop(1e300);
        ASSERT_TRUE(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(5));
        ASSERT_EQ(srv.stats().pool_allocated, 0);
    });
}

TEST_MAIN()
