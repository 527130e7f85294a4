// Hundreds of clients with data in flight, then stop(): the program `nox -s valgrind` runs under
// memcheck (built without sanitizers), and a CTest like the others (so ASan/LSan and TSan see it
// too). Once per backend available here.
//
// Every client first proves its connection works (a byte-exact echo), then leaves the server
// with work in flight: a third, with small fixed receive buffers, send far more than the socket
// buffers hold and never read (the server's sends wait for space, its reads pause), the rest send a
// small message and never read the echo. stop() must then cancel and drain all of it: every IoData
// back in the pool, the pool freed, no connection left, and every client sees its connection end.
#include <chrono>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "backend/backend.hpp"
#include "iocpnative/client.hpp"
#include "iocpnative/errors.hpp"
#include "iocpnative/server.hpp"
#include "test_harness.hpp"
#include "test_util.hpp"

using namespace iocpnative;
using testutil::config_for;
using testutil::expect_pool_freed;
using testutil::for_each_backend;
using testutil::random_bytes;
using testutil::wait_until;

namespace {

constexpr int kClients = 300;
constexpr int kFlooders = kClients / 3;  // every third client
constexpr size_t kFloodBytes = size_t{4} << 20;
// A flooder's receive buffer: fixed and small, so the server's echo of the flood cannot all fit
// on the way to it (autotuned, loopback's can grow to tcp_rmem's maximum, 32 MiB on some hosts).
constexpr int kFlooderRecvBuffer = 16384;

// Reads until EOF or a reset; returns true when the connection ended (what stop() promises).
bool ends(Client& cli) {
    char buf[65536];
    try {
        for (;;) {
            if (cli.recv(buf, sizeof(buf)) == 0) return true;
        }
    } catch (const TimeoutError&) {
        return false;
    } catch (const SystemError&) {
        return true;  // ECONNRESET: the server closed with our unread data in its buffers
    }
}

void run_backend(const std::string& backend) {
    ServerConfig cfg;
    cfg.port = 0;
    cfg.workers = 2;
    cfg.backend = backend;
    cfg.buffer_size = 4096;
    cfg.max_connections = kClients + 10;
    Server srv(cfg);
    srv.start();

    std::vector<std::unique_ptr<Client>> clients;
    clients.reserve(kClients);
    std::mt19937 rng(42);
    int64_t sent = 0;
    for (int i = 0; i < kClients; ++i) {
        const int rcvbuf = i % 3 == 0 ? kFlooderRecvBuffer : 0;
        clients.push_back(std::make_unique<Client>("127.0.0.1", srv.port(), 20.0, rcvbuf));
        const std::string msg = random_bytes(1 + rng() % 20000, static_cast<unsigned>(i));
        std::string back(msg.size(), '\0');
        clients.back()->request(msg.data(), msg.size(), &back[0]);
        ASSERT_TRUE(back == msg);
        sent += static_cast<int64_t>(msg.size());
    }
    ASSERT_EQ(srv.stats().active_connections, kClients);

    const std::string flood = random_bytes(kFloodBytes, 1);
    const std::string small = random_bytes(1500, 2);
    for (int i = 0; i < kClients; ++i) {
        Client& c = *clients[static_cast<size_t>(i)];
        if (i % 3 == 0) {
            c.set_timeout(0.05);
            try {
                c.send(flood.data(), flood.size());
            } catch (const TimeoutError&) {
                // Expected: we never read, so the server stops reading from us.
            }
            c.set_timeout(20.0);
        } else {
            c.send(small.data(), small.size());
            sent += static_cast<int64_t>(small.size());
        }
    }
    // The small messages have reached the server; the floods are stuck mid-way: each flooder's
    // echo waits in a send for room the flooder never makes.
    ASSERT_TRUE(wait_until([&] { return srv.stats().bytes_received >= sent; }, 60.0));
    const auto t0 = std::chrono::steady_clock::now();
    ServerStats during;  // the stats() that showed them
    ASSERT_TRUE(wait_until([&] { return (during = srv.stats()).pool_in_use >= kFlooders; }, 60.0));
    ASSERT_EQ(during.active_connections, kClients);
    std::printf("  %s: %lld IoData in use at stop (after %.2f s)\n", backend.c_str(),
                static_cast<long long>(during.pool_in_use),
                std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    // At most one operation per connection, plus the listener's own: the IOCP backend keeps
    // up to 64 AcceptEx posted, each owning an IoData (epoll and io_uring hold none).
    ASSERT_LE(during.pool_in_use, kClients + 64);

    srv.stop(30.0);
    const ServerStats after = srv.stats();
    ASSERT_EQ(after.pool_in_use, 0);
    ASSERT_EQ(after.pool_allocated, 0);
    ASSERT_EQ(after.active_connections, 0);
    ASSERT_EQ(after.total_connections, kClients);
    for (auto& c : clients) ASSERT_TRUE(ends(*c));
}

}  // namespace

TEST_CASE(hundreds_of_clients_stop_in_flight) {
    const auto names = testh::backends_under_test(available_backends());
    if (names.empty()) return testh::kSkip;
    for (const auto& name : names) {
        std::printf("  backend %s\n", name.c_str());
        run_backend(name);
    }
    return testh::kPass;
}

TEST_MAIN()
