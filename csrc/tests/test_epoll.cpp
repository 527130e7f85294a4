// The epoll backend's batch waits (epoll_backend.cpp): a worker that would sleep while requests
// come fast enough sleeps through a window no arriving data ends, and answers the batch; an idle
// worker sleeps, and stop() ends a batch wait at once. (A lone busy client among idle ones is not
// held: test_server.cpp, on every backend.)
#include <chrono>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "iocpnative/client.hpp"
#include "iocpnative/server.hpp"
#include "test_harness.hpp"
#include "test_util.hpp"

using namespace iocpnative;
using testutil::expect_pool_freed;
using testutil::random_bytes;

namespace {

ServerConfig epoll_config(int batch_wait_us) {
    ServerConfig cfg;
    cfg.port = 0;
    cfg.workers = 1;
    cfg.backend = "epoll";
    cfg.batch_wait_us = batch_wait_us;
    return cfg;
}

// `n` clients, each served one request (so the worker has seen them all), then left idle.
std::vector<std::unique_ptr<Client>> idle_clients(Server& srv, int n) {
    std::vector<std::unique_ptr<Client>> clients;
    for (int i = 0; i < n; ++i) {
        clients.push_back(std::make_unique<Client>("127.0.0.1", srv.port(), 5.0));
        char back[2];
        clients.back()->request("hi", 2, back);
    }
    return clients;
}

// Reads exactly `n` bytes.
std::string recv_exact(Client& c, size_t n) {
    std::string out(n, '\0');
    for (size_t got = 0; got < n;) {
        const size_t r = c.recv(&out[got], n - got);
        if (r == 0) throw std::runtime_error("connection closed");
        got += r;
    }
    return out;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

// Requests from many connections at once are answered in one batch: 40 clients each send a
// request together, and every reply comes back (the count, not only the window, can end a wait).
// Then stop() while the worker sleeps in a batch wait of a 1 s window: wake() ends it at once.
TEST_CASE(batch_waits_answer_every_request_and_stop_ends_them) {
    Server srv(epoll_config(1000000));
    srv.start();
    auto clients = idle_clients(srv, 40);
    for (int round = 0; round < 5; ++round) {
        for (auto& c : clients) c->send("ping", 4);
        for (auto& c : clients) ASSERT_TRUE(recv_exact(*c, 4) == "ping");
        std::this_thread::sleep_for(std::chrono::milliseconds(10));  // a span goes by
    }
    // The rounds turned batch waits on (each gathered a whole round): after the last one the
    // worker sleeps in a batch wait for the next, up to the window.
    const auto t0 = std::chrono::steady_clock::now();
    srv.stop(5.0);
    const double took = seconds_since(t0);
    std::printf("  stop() took %.3f s during a 1 s batch window\n", took);
    ASSERT_TRUE(took < 0.5);
    expect_pool_freed(srv);
    return testh::kPass;
}

// An idle worker sleeps, after batch waits were on too: no batch wait without arrivals.
TEST_CASE(idle_server_sleeps_after_batching) {
    Server srv(epoll_config(200));
    srv.start();
    auto clients = idle_clients(srv, 40);
    for (int round = 0; round < 50; ++round) {
        for (auto& c : clients) c->send("ping", 4);
        for (auto& c : clients) ASSERT_TRUE(recv_exact(*c, 4) == "ping");
    }
    ASSERT_TRUE(testutil::idle_context_switches() < 30);
    srv.stop(5.0);
    expect_pool_freed(srv);
    return testh::kPass;
}

TEST_MAIN()
