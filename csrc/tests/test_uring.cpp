// The io_uring backend specifically: the probe's test hook, the setup-flag fallbacks, the echo
// path with every optional kernel feature switched off (IOCPNATIVE_URING_DISABLE), idle
// connections that pin no IoData with a provided buffer ring, a burst of more connections with
// data than the ring has buffers (-ENOBUFS: own IoData, then waiting for the ring), buffers
// going back to the ring after use, the ring growing when many more connections are busy,
// batch waits (a wait for a CQE, an idle server asleep, no window for a lone busy client), the
// wait policies span by span (batch waits, polling), stop() cancelling many connections
// with data in flight, and SQEs that waited for room in the SQ submitted before a wait blocks.
// Skipped (77) where io_uring is unavailable (the policy tests run everywhere).
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <dirent.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <fstream>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "backend/backend.hpp"
#include "backend/uring/uring_sys.hpp"
#include "backend/wait_policy.hpp"
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

namespace {

bool uring_available() {
    for (const auto& name : available_backends()) {
        if (name == "io_uring") return true;
    }
    return false;
}

// Sets IOCPNATIVE_URING_DISABLE for the lifetime of the object (the backend reads it whenever
// a server starts).
class DisableFeatures {
  public:
    explicit DisableFeatures(const char* list) { ::setenv("IOCPNATIVE_URING_DISABLE", list, 1); }
    ~DisableFeatures() { ::unsetenv("IOCPNATIVE_URING_DISABLE"); }
};

ServerConfig uring_config() {
    ServerConfig cfg;
    cfg.port = 0;
    cfg.workers = 2;
    cfg.backend = "io_uring";
    return cfg;
}

// Echo through small buffers (short sends, many recvs), then stop with clients that never read.
void echo_and_stop_in_flight() {
    ServerConfig cfg = uring_config();
    cfg.buffer_size = 1000;
    Server srv(cfg);
    srv.start();
    ASSERT_TRUE(srv.backend() == "io_uring");
    {
        Client cli("127.0.0.1", srv.port(), 10.0);
        for (size_t n : {size_t{1}, size_t{1000}, size_t{1001}, size_t{1} << 20}) {
            const std::string out = random_bytes(n, static_cast<unsigned>(n));
            std::string back(n, '\0');
            cli.request(out.data(), n, &back[0]);
            ASSERT_TRUE(back == out);
        }
    }
    std::vector<std::unique_ptr<Client>> stuck;
    const std::string blob = random_bytes(8u << 20, 3);
    for (int i = 0; i < 4; ++i) {
        stuck.push_back(std::make_unique<Client>("127.0.0.1", srv.port(), 0.2));
        try {
            stuck.back()->send(blob.data(), blob.size());
        } catch (const TimeoutError&) {
            // The server's sends wait for us to read, which we never do.
        }
    }
    srv.stop(5.0);
    expect_pool_freed(srv);
}

}  // namespace

TEST_CASE(probe_hook_makes_probe_fail) {
    ::setenv("IOCPNATIVE_DISABLE_IO_URING", "1", 1);
    const std::string reason = uring::probe();
    ::unsetenv("IOCPNATIVE_DISABLE_IO_URING");
    ASSERT_TRUE(reason == "disabled by IOCPNATIVE_DISABLE_IO_URING");
    if (!uring_available()) return testh::kSkip;
    ASSERT_TRUE(uring::probe().empty());
    return testh::kPass;
}

TEST_CASE(setup_flags_fall_back) {
    if (!uring_available()) return testh::kSkip;
    uring::Features none;
    none.defer_taskrun = none.single_issuer = none.coop_taskrun = none.submit_all = false;
    uring::Ring plain(8, 16, none);
    ASSERT_TRUE(plain.describe_flags() == "none");
    plain.enable();
    // Best available: whatever the kernel took, DEFER_TASKRUN never comes without SINGLE_ISSUER.
    uring::Ring best(8, 16, uring::Features{});
    std::printf("  setup flags here: %s\n", best.describe_flags().c_str());
    if (best.setup_flags() & IORING_SETUP_DEFER_TASKRUN) {
        ASSERT_TRUE((best.setup_flags() & IORING_SETUP_SINGLE_ISSUER) != 0);
    }
    best.enable();
    // A NOP through the enabled ring: submit and wait in one call, one CQE back.
    io_uring_sqe* sqe = best.get_sqe();
    ASSERT_TRUE(sqe != nullptr);
    sqe->opcode = IORING_OP_NOP;
    sqe->user_data = 42;
    ASSERT_EQ(best.enter(1, 1000), 0);
    ASSERT_EQ(best.ready(), 1u);
    ASSERT_EQ(best.cqe(0).user_data, uint64_t{42});
    best.consume(1);
    ASSERT_EQ(best.ready(), 0u);
    return testh::kPass;
}

TEST_CASE(echo_with_each_feature_off) {
    if (!uring_available()) return testh::kSkip;
    for (const char* off : {"", "pbuf_ring", "multishot_recv", "multishot_accept", "defer_taskrun",
                            "defer_taskrun,single_issuer", "poll", "all"}) {
        std::printf("  IOCPNATIVE_URING_DISABLE=%s\n", off);
        DisableFeatures guard(off);
        echo_and_stop_in_flight();
    }
    return testh::kPass;
}

TEST_CASE(idle_connections_pin_no_iodata) {
    if (!uring_available()) return testh::kSkip;
    constexpr int kIdle = 100;
    for (bool buffer_ring : {true, false}) {
        DisableFeatures guard(buffer_ring ? "" : "pbuf_ring");
        Server srv(uring_config());
        srv.start();
        std::vector<std::unique_ptr<Client>> idle;
        for (int i = 0; i < kIdle; ++i) {
            idle.push_back(std::make_unique<Client>("127.0.0.1", srv.port(), 5.0));
            char back[2];
            idle.back()->request("hi", 2, back);  // accepted and served: a recv now waits
        }
        ASSERT_EQ(srv.stats().active_connections, kIdle);
        // With the buffer ring a waiting recv holds nothing; without it each holds an IoData.
        // (The last replies' send completions may still be on their way: give them a moment.)
        const int64_t want = buffer_ring ? 0 : kIdle;
        testutil::wait_until([&] { return srv.stats().pool_in_use == want; }, 5.0);
        ASSERT_EQ(srv.stats().pool_in_use, want);
        srv.stop(5.0);
        expect_pool_freed(srv);
    }
    return testh::kPass;
}

namespace {

// Connects `n` clients to `srv` and waits until the server has them all.
std::vector<std::unique_ptr<Client>> connect_all(Server& srv, int n) {
    std::vector<std::unique_ptr<Client>> clients;
    for (int i = 0; i < n; ++i) {
        clients.push_back(std::make_unique<Client>("127.0.0.1", srv.port(), 5.0));
    }
    testutil::wait_until([&] { return srv.stats().active_connections >= n; }, 10.0);
    if (srv.stats().active_connections != n) throw std::runtime_error("clients not all accepted");
    return clients;
}

// Every client sends `size` bytes at once; with read_replies, each must get its own back.
void burst(std::vector<std::unique_ptr<Client>>& clients, size_t size, unsigned seed,
           bool read_replies) {
    std::vector<std::string> sent;
    for (size_t i = 0; i < clients.size(); ++i) {
        sent.push_back(random_bytes(size, seed + static_cast<unsigned>(i)));
        clients[i]->send(sent.back().data(), size);
    }
    if (!read_replies) return;
    for (size_t i = 0; i < clients.size(); ++i) {
        std::string back(size, '\0');
        size_t got = 0;
        while (got < size) {
            const size_t n = clients[i]->recv(&back[got], size - got);
            if (n == 0) throw std::runtime_error("EOF before the echo");
            got += n;
        }
        if (back != sent[i]) throw std::runtime_error("echo differs");
    }
}

}  // namespace

// 400 connections on one worker send at once: more recvs complete in one io_uring_enter than
// the ring's 32 buffers, so some read into an IoData of their own and the rest wait for the
// ring. Every byte must come back; then (second pass) stop() with such a burst unanswered.
// 400 connections are too few to grow the ring (one buffer per 16 connections).
TEST_CASE(burst_beyond_buffer_ring) {
    if (!uring_available()) return testh::kSkip;
    for (bool read_replies : {true, false}) {
        ServerConfig cfg = uring_config();
        cfg.workers = 1;
        Server srv(cfg);
        srv.start();
        ASSERT_EQ(srv.stats().recv_buffers, 32);
        auto clients = connect_all(srv, 400);
        burst(clients, 200, 0, read_replies);
        ASSERT_EQ(srv.stats().recv_buffers, 32);
        srv.stop(5.0);
        expect_pool_freed(srv);
        ASSERT_EQ(srv.stats().recv_buffers, 0);
    }
    return testh::kPass;
}

// A provided buffer goes back to the ring as soon as its bytes are copied out. 40 connections on
// one worker each echo a 64 KiB message, which puts them in bulk mode: each then waits with a
// recv into an IoData of its own, 40 IoData in use, more than kOwnRecvLimit (32). A new
// connection's messages still come through the ring, more of them than it has buffers. Had the
// buffers not come back, the ring would be empty by then (40 recvs took one each), and with that
// many IoData in use a recv that meets -ENOBUFS waits for the ring: for ever. Multishot and
// single recvs.
TEST_CASE(ring_buffers_come_back_after_use) {
    if (!uring_available()) return testh::kSkip;
    for (const char* off : {"", "multishot_recv"}) {
        std::printf("  disabled: '%s'\n", off);
        DisableFeatures guard(off);
        ServerConfig cfg = uring_config();
        cfg.workers = 1;
        Server srv(cfg);
        srv.start();
        ASSERT_EQ(srv.stats().recv_buffers, 32);
        const std::string big = random_bytes(64u << 10, 5);
        std::string back(big.size(), '\0');
        std::vector<std::unique_ptr<Client>> bulk;
        for (int i = 0; i < 40; ++i) {
            bulk.push_back(std::make_unique<Client>("127.0.0.1", srv.port(), 5.0));
            bulk.back()->request(big.data(), big.size(), &back[0]);
            ASSERT_TRUE(back == big);
        }
        testutil::wait_until([&] { return srv.stats().pool_in_use == 40; }, 5.0);
        ASSERT_EQ(srv.stats().pool_in_use, 40);
        Client fresh("127.0.0.1", srv.port(), 5.0);
        for (int i = 0; i < 100; ++i) {
            const std::string msg = "small " + std::to_string(i);
            std::string reply(msg.size(), '\0');
            fresh.request(msg.data(), msg.size(), &reply[0]);
            ASSERT_TRUE(reply == msg);
        }
        ASSERT_EQ(srv.stats().recv_buffers, 32);
        srv.stop(5.0);
        expect_pool_freed(srv);
    }
    return testh::kPass;
}

// Echoes, except that the one-byte chunk "G" (the other chunks are 300 bytes) holds the worker
// until release():
// whatever arrives meanwhile is there at once when the worker next asks the kernel.
class GateEcho final : public DataHandler {
  public:
    bool on_data(uint64_t, const char* data, size_t len, std::string& out) override {
        if (len == 1 && data[0] == 'G') {
            held_.store(true);
            while (!open_.load()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
        }
        out.assign(data, len);
        return true;
    }
    bool holding() const { return held_.load(); }
    void release() { open_.store(true); }

  private:
    std::atomic<bool> held_{false};
    std::atomic<bool> open_{false};
};

// 1,600 busy connections on one worker: their data arrives while the worker is held, so its
// next io_uring_enter completes far more recvs than the ring's 32 buffers; the ring then grows
// to one buffer per 16 connections (100), and every echo is exact, during and after.
TEST_CASE(buffer_ring_grows_with_busy_connections) {
    if (!uring_available()) return testh::kSkip;
    rlimit rl{};
    ASSERT_EQ(::getrlimit(RLIMIT_NOFILE, &rl), 0);
    if (rl.rlim_cur < 4000 && rl.rlim_max != rl.rlim_cur) {
        rl.rlim_cur = rl.rlim_max == RLIM_INFINITY ? 4000 : std::min<rlim_t>(rl.rlim_max, 4000);
        ::setrlimit(RLIMIT_NOFILE, &rl);  // best effort: a low limit shows as a connect error
    }
    ServerConfig cfg = uring_config();
    cfg.workers = 1;
    auto gate = std::make_shared<GateEcho>();
    Server srv(cfg, gate);
    srv.start();
    auto clients = connect_all(srv, 1600);
    ASSERT_EQ(srv.stats().recv_buffers, 32);  // idle connections grow nothing
    Client holder("127.0.0.1", srv.port(), 5.0);
    holder.send("G", 1);
    ASSERT_TRUE(testutil::wait_until([&] { return gate->holding(); }, 5.0));
    std::thread opener([&] {
        std::this_thread::sleep_for(std::chrono::milliseconds(300));
        gate->release();
    });
    burst(clients, 300, 10000, true);  // sent while held, read after the release
    opener.join();
    ASSERT_EQ(srv.stats().recv_buffers, 1600 / 16);
    burst(clients, 300, 20000, true);
    char g = 0;
    ASSERT_EQ(holder.recv(&g, 1), 1u);
    ASSERT_EQ(g, 'G');
    srv.stop(5.0);
    expect_pool_freed(srv);
    ASSERT_EQ(srv.stats().recv_buffers, 0);
    return testh::kPass;
}

namespace {

// A blocking TCP connection to 127.0.0.1:port. (Not with small socket buffers: on loopback,
// whose MSS is about 64 KiB, a receive buffer that small can stay shut for seconds.)
int connect_raw(int port) {
    const int s = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(static_cast<uint16_t>(port));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (s < 0 || ::connect(s, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) {
        throw std::runtime_error("connect failed");
    }
    return s;
}

}  // namespace

// Clients that pipeline 1000-byte messages and read nothing back until the server can send no
// more: while the replies wait, the server reads ahead at most one buffer per connection (the
// multishot recv's byte limit, or one recv at a time), so pool_in_use stays <= 2 per connection
// (the blocked reply and the read-ahead). Then every byte comes back in order.
TEST_CASE(pipelined_clients_read_ahead_at_most_one_buffer) {
    if (!uring_available()) return testh::kSkip;
    constexpr int kConns = 8;
    constexpr size_t kChunk = 1000;
    for (const char* off : {"", "multishot_recv"}) {
        std::printf("  IOCPNATIVE_URING_DISABLE=%s\n", off);
        DisableFeatures guard(off);
        ServerConfig cfg = uring_config();
        cfg.workers = 1;
        Server srv(cfg);
        srv.start();
        std::vector<int> socks;
        std::vector<std::string> sent(kConns);
        for (int i = 0; i < kConns; ++i) {
            socks.push_back(connect_raw(srv.port()));
            ASSERT_EQ(::fcntl(socks.back(), F_SETFL, O_NONBLOCK), 0);
        }
        // Round robin, one chunk per socket per round, until no socket took any for 100 ms.
        const std::string pattern = random_bytes(1u << 16, 5);
        auto idle_since = std::chrono::steady_clock::now();
        while (std::chrono::steady_clock::now() - idle_since < std::chrono::milliseconds(100)) {
            bool progress = false;
            for (int i = 0; i < kConns; ++i) {
                std::string& out = sent[static_cast<size_t>(i)];
                const size_t at =
                    (out.size() + static_cast<size_t>(i) * 977) % (pattern.size() - kChunk);
                const ssize_t n = ::send(socks[static_cast<size_t>(i)], pattern.data() + at, kChunk,
                                         MSG_NOSIGNAL);
                if (n > 0) {
                    out.append(pattern.data() + at, static_cast<size_t>(n));
                    progress = true;
                }
            }
            if (progress) {
                idle_since = std::chrono::steady_clock::now();
            } else {
                std::this_thread::sleep_for(std::chrono::milliseconds(2));
            }
        }
        for (const auto& out : sent) ASSERT_GT(out.size(), size_t{1} << 20);  // replies are stuck
        const ServerStats during = srv.stats();
        ASSERT_EQ(during.active_connections, kConns);
        ASSERT_LE(during.pool_in_use, 2 * kConns);
        for (int i = 0; i < kConns; ++i) {
            const int s = socks[static_cast<size_t>(i)];
            const std::string& want = sent[static_cast<size_t>(i)];
            std::string got;
            std::vector<char> buf(1u << 16);
            while (got.size() < want.size()) {
                pollfd p{s, POLLIN, 0};
                ASSERT_EQ(::poll(&p, 1, 5000), 1);
                const ssize_t n = ::recv(s, buf.data(), buf.size(), 0);
                ASSERT_GT(n, 0);
                got.append(buf.data(), static_cast<size_t>(n));
            }
            ASSERT_TRUE(got == want);
        }
        for (int s : socks) ::close(s);
        srv.stop(5.0);
        expect_pool_freed(srv);
    }
    return testh::kPass;
}

namespace {

// `n` connections, each served one request, then left idle (a recv posted on each).
std::vector<std::unique_ptr<Client>> connect_and_serve_once(Server& srv, int n) {
    auto clients = connect_all(srv, n);
    for (auto& c : clients) {
        char back[2];
        c->request("hi", 2, back);
    }
    return clients;
}

}  // namespace

// A batch wait with no timeout of its own waits for a completion: the kernel takes "no general
// timeout" to mean that the batch window is the timeout, so without one the wait ended empty after
// min_wait_us (ETIME, no CQE), and an idle worker with many recvs posted woke every batch window.
TEST_CASE(batch_wait_without_timeout_waits_for_a_completion) {
    if (!uring_available()) return testh::kSkip;
    uring::Ring ring(8, 16, uring::Features{});
    ring.enable();
    if (!ring.has_min_wait()) return testh::kSkip;  // no batch waits on this kernel
    __kernel_timespec ts{};
    ts.tv_nsec = 150 * 1000000LL;
    io_uring_sqe* sqe = ring.get_sqe();
    ASSERT_TRUE(sqe != nullptr);
    sqe->opcode = IORING_OP_TIMEOUT;  // the only completion to come, after 150 ms
    sqe->addr = reinterpret_cast<uint64_t>(&ts);
    sqe->len = 1;
    sqe->user_data = 7;
    const auto t0 = std::chrono::steady_clock::now();
    const int rc = ring.enter(2, -1, 1000);  // batch of 2, 1 ms window, no timeout
    const auto waited = std::chrono::steady_clock::now() - t0;
    std::printf("  enter -> %d after %lld ms, %u CQE\n", rc,
                static_cast<long long>(
                    std::chrono::duration_cast<std::chrono::milliseconds>(waited).count()),
                ring.ready());
    ASSERT_EQ(rc, 0);
    ASSERT_EQ(ring.ready(), 1u);
    ASSERT_EQ(ring.cqe(0).user_data, uint64_t{7});
    ASSERT_EQ(ring.cqe(0).res, -ETIME);  // the timeout operation's own result
    ASSERT_TRUE(waited >= std::chrono::milliseconds(140));
    ring.consume(1);
    return testh::kPass;
}

// The batch wait of kernels without min_wait: enter_window() asks for a batch and returns when the
// window ends, with what came (here one of the two reads asked for: its data came after 5 ms, and
// did not end the wait), not before and not later. (Not with IORING_OP_TIMEOUT completions: the
// kernel ends every wait when one of those fires.)
TEST_CASE(enter_window_returns_after_the_window_with_what_came) {
    if (!uring_available()) return testh::kSkip;
    uring::Ring ring(8, 16, uring::Features{});
    ring.enable();
    if (!ring.defers_taskrun() || !uring::kernel_at_least(6, 7)) return testh::kSkip;
    int pipes[2][2];
    for (auto& p : pipes) ASSERT_EQ(::pipe(p), 0);
    char buf[2][8];
    for (uint64_t i = 0; i < 2; ++i) {
        io_uring_sqe* sqe = ring.get_sqe();
        ASSERT_TRUE(sqe != nullptr);
        sqe->opcode = IORING_OP_READ;
        sqe->fd = pipes[i][0];
        sqe->addr = reinterpret_cast<uint64_t>(buf[i]);
        sqe->len = sizeof buf[i];
        sqe->off = static_cast<uint64_t>(-1);  // the file position: none for a pipe
        sqe->user_data = i + 1;
    }
    std::thread writer([&] {
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
        (void)!::write(pipes[0][1], "x", 1);
    });
    const auto t0 = std::chrono::steady_clock::now();
    const int rc = ring.enter_window(2, 100 * 1000);  // a batch of 2, a 100 ms window
    const auto waited = std::chrono::steady_clock::now() - t0;
    writer.join();
    std::printf("  enter_window -> %d after %lld ms, %u CQE\n", rc,
                static_cast<long long>(
                    std::chrono::duration_cast<std::chrono::milliseconds>(waited).count()),
                ring.ready());
    ASSERT_TRUE(rc == 0 || rc == -ETIME);  // 0 when the call also submitted, as here
    ASSERT_EQ(ring.ready(), 1u);
    ASSERT_EQ(ring.cqe(0).user_data, uint64_t{1});
    ASSERT_EQ(ring.cqe(0).res, 1);
    ASSERT_TRUE(waited >= std::chrono::milliseconds(90));
    ASSERT_TRUE(waited < std::chrono::seconds(5));
    ring.consume(1);
    (void)!::write(pipes[1][1], "y", 1);  // the second read completes: nothing left in flight
    ASSERT_EQ(ring.enter(1, 5000), 0);
    ASSERT_EQ(ring.ready(), 1u);
    ring.consume(1);
    for (auto& p : pipes) {
        ::close(p[0]);
        ::close(p[1]);
    }
    return testh::kPass;
}

// An idle server sleeps: with 100 idle connections (each served once), the process's threads
// switch context only a few times in 300 ms. (The batch-wait bug above: about 1,200.) Also with
// the batch waits emulated (min_wait off), whose empty window must end in a plain wait.
TEST_CASE(idle_server_sleeps) {
    if (!uring_available()) return testh::kSkip;
    for (const char* off : {"", "min_wait"}) {
        std::printf("  IOCPNATIVE_URING_DISABLE=%s\n", off);
        DisableFeatures disable(off);
        ServerConfig cfg = uring_config();
        cfg.workers = 1;
        Server srv(cfg);
        srv.start();
        auto idle = connect_and_serve_once(srv, 100);
        ASSERT_TRUE(testutil::idle_context_switches() < 30);
        srv.stop(5.0);
        expect_pool_freed(srv);
    }
    return testh::kPass;
}

// BatchPolicy, span by span (5 ms spans, 200 us window): on from 1.25 arrivals per window; a
// span whose batch waits gathered less turns it off for 2 spans, the next failure for 4; a span
// in which they paid starts the doubling over.
TEST_CASE(batch_policy_needs_the_rate_and_the_yield) {
    waits::BatchPolicy p;
    ASSERT_TRUE(!p.on());
    auto span = [&](int arrivals, int waits, int gathered_each) {
        for (int i = 0; i < arrivals; ++i) p.arrival();
        for (int i = 0; i < waits; ++i) p.batch_wait(gathered_each);
        return p.end_span(5000, 200);
    };
    ASSERT_TRUE(!span(31, 0, 0));  // 1.24 per window
    ASSERT_TRUE(span(32, 0, 0));   // 1.28
    // 10 batch waits gathering 1 each: failed, off for 2 spans although the rate is high.
    ASSERT_TRUE(!span(100, 10, 1));
    ASSERT_TRUE(!span(100, 0, 0));
    ASSERT_TRUE(span(100, 0, 0));
    ASSERT_TRUE(!span(100, 10, 1));  // second failure: off for 4
    for (int i = 0; i < 3; ++i) ASSERT_TRUE(!span(100, 0, 0));
    ASSERT_TRUE(span(100, 0, 0));
    // Batch waits gathering 2 each pay: on, and the next failure is back to 2 spans off.
    ASSERT_TRUE(span(100, 10, 2));
    ASSERT_TRUE(!span(100, 10, 1));
    ASSERT_TRUE(!span(100, 0, 0));
    ASSERT_TRUE(span(100, 0, 0));
    ASSERT_TRUE(!span(0, 0, 0));  // no arrivals: off
    return testh::kPass;
}

// SpinPolicy, span by span (5 ms spans): off, it turns on when 20 or more blocking waits ended, at
// least half of them within kSpinUs, or when the worker slept less than a fifth of the span; on,
// it stays on while 9 in 10 polls found a completion; when it turns off it stays off for 2, then
// 4 spans whatever the waits.
TEST_CASE(spin_policy_polls_only_when_waits_are_short) {
    waits::SpinPolicy p;
    // `within` and `longer` waits (or polls), asleep for `slept_us` of the span in all.
    auto span = [&](int within, int longer, int64_t slept_us = 2500) {
        for (int i = 0; i < within; ++i) p.waited(true);
        for (int i = 0; i < longer; ++i) p.waited(false);
        p.slept(slept_us);
        return p.end_span(5000);
    };
    ASSERT_TRUE(!p.on());
    ASSERT_TRUE(!span(19, 0));   // too few waits to judge
    ASSERT_TRUE(!span(9, 11));   // fewer than half short
    ASSERT_TRUE(span(10, 10));   // half: poll
    ASSERT_TRUE(span(90, 10));   // 9 in 10 polls found one: go on
    ASSERT_TRUE(!span(89, 11));  // fewer: stop, and hold off for 2 spans
    ASSERT_TRUE(!span(100, 0));
    ASSERT_TRUE(!span(100, 0));
    ASSERT_TRUE(span(100, 0));
    ASSERT_TRUE(!span(0, 100));  // second failure: 4 spans
    for (int i = 0; i < 4; ++i) ASSERT_TRUE(!span(100, 0));
    ASSERT_TRUE(span(100, 0));
    ASSERT_TRUE(!span(0, 0));  // a span without polls while polling: off
    return testh::kPass;
}

// A worker busy four fifths of the span or more polls whatever kind of wait it used (batch waits
// do not feed waited()); still on only while 9 in 10 polls find a completion.
TEST_CASE(spin_policy_polls_when_the_worker_is_busy) {
    waits::SpinPolicy p;
    p.slept(1000);  // asleep a fifth of the span: not busy enough
    ASSERT_TRUE(!p.end_span(5000));
    p.slept(999);  // just under a fifth, no plain waits at all
    ASSERT_TRUE(p.end_span(5000));
    for (int i = 0; i < 9; ++i) p.waited(true);
    p.waited(false);
    p.slept(4000);  // while on, only the polls count
    ASSERT_TRUE(p.end_span(5000));
    p.waited(false);
    ASSERT_TRUE(!p.end_span(5000));  // the poll found nothing: off, held for 2 spans...
    ASSERT_TRUE(!p.end_span(5000));  // ...although slept 0
    ASSERT_TRUE(!p.end_span(5000));
    ASSERT_TRUE(p.end_span(5000));  // a span of work without a wait
    return testh::kPass;
}

TEST_CASE(stop_cancels_many_connections) {
    if (!uring_available()) return testh::kSkip;
    ServerConfig cfg = uring_config();
    cfg.buffer_size = 4096;
    Server srv(cfg);
    srv.start();
    // 200 idle connections (a recv each), 10 that flood and never read (a send each, blocked),
    // and 50 that are mid-echo when stop() comes.
    std::vector<std::unique_ptr<Client>> clients;
    for (int i = 0; i < 200; ++i) {
        clients.push_back(std::make_unique<Client>("127.0.0.1", srv.port(), 5.0));
    }
    const std::string blob = random_bytes(32u << 20, 11);
    for (int i = 0; i < 10; ++i) {
        clients.push_back(std::make_unique<Client>("127.0.0.1", srv.port(), 0.2));
        try {
            clients.back()->send(blob.data(), blob.size());
        } catch (const TimeoutError&) {
            // Expected: the server stopped reading us.
        }
    }
    for (int i = 0; i < 50; ++i) {
        clients.push_back(std::make_unique<Client>("127.0.0.1", srv.port(), 5.0));
        clients.back()->send(blob.data(), 64u << 10);
    }
    testutil::wait_until([&] { return srv.stats().active_connections >= 260; }, 5.0);
    ASSERT_EQ(srv.stats().active_connections, 260);
    ASSERT_GT(srv.stats().pool_in_use, 0);
    srv.stop(5.0);
    expect_pool_freed(srv);
    // Every client sees the connection end.
    char buf[4096];
    for (auto& c : clients) {
        c->set_timeout(5.0);
        try {
            while (c->recv(buf, sizeof(buf)) > 0) {
            }
        } catch (const SystemError&) {
            // A reset is an end too (the server closed with our bytes unread).
        }
    }
    return testh::kPass;
}

namespace {

// A Poller of the io_uring backend driven by hand, as a Worker drives it, for orders of events
// that a server does not produce on demand. Its connections are socketpairs; `peer(i)` is the
// other end of connection i.
class HandDriven {
  public:
    explicit HandDriven(int conns) : pool_(4096, false) {
        listener_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        sockaddr_in a{};
        a.sin_family = AF_INET;
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        if (listener_ < 0 || ::bind(listener_, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 ||
            ::listen(listener_, 16) != 0) {
            throw std::runtime_error("listener");
        }
        PollerContext ctx;
        ctx.listener = listener_;
        ctx.pool = &pool_;
        ctx.stats = &stats_;
        backend_ = create_backend("io_uring");
        poller_ = backend_->make_poller(ctx);
        for (int i = 0; i < conns; ++i) {
            int sv[2];
            if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) {
                throw std::runtime_error("socketpair");
            }
            conns_.push_back(std::make_unique<Connection>());
            conns_.back()->sock = sv[0];
            peers_.push_back(sv[1]);
            if (poller_->attach(*conns_.back()) != 0) throw std::runtime_error("attach");
        }
    }
    ~HandDriven() {
        poller_.reset();
        for (int s : peers_) ::close(s);
        ::close(listener_);
    }

    Poller& poller() { return *poller_; }
    IoDataPool& pool() { return pool_; }
    Connection& conn(size_t i) { return *conns_[i]; }
    int peer(size_t i) const { return peers_[i]; }

    void post_recv(Connection& c) {
        ++c.ops_in_flight;
        poller_->post_recv(c);
    }

    // What the Worker does with an event: the operation is over, its IoData goes back.
    void handle(const Event& ev) {
        if (ev.kind == Event::Kind::Released) {
            ev.conn->backend_holds = false;
            return;
        }
        if (ev.kind == Event::Kind::Accepted) {
            ::close(ev.accepted);
            return;
        }
        pool_.release(ev.io);
        --ev.conn->ops_in_flight;
    }

    // Closes every connection and handles events until nothing is in flight (false after 5 s).
    bool close_all_and_drain() {
        for (auto& c : conns_) {
            if (!c->closing) {
                c->closing = true;
                poller_->close(*c);
            }
        }
        poller_->stop_accepting();
        Event ev[128];
        const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
        while (std::chrono::steady_clock::now() < deadline) {
            bool busy = !poller_->quiescent();
            for (auto& c : conns_) busy = busy || c->ops_in_flight != 0 || c->backend_holds;
            if (!busy) return true;
            const int n = poller_->wait(ev, 128, 10);
            for (int i = 0; i < n; ++i) handle(ev[i]);
        }
        return false;
    }

  private:
    IoDataPool pool_;
    WorkerStats stats_;
    int listener_ = -1;
    std::unique_ptr<Backend> backend_;
    std::unique_ptr<Poller> poller_;
    std::vector<std::unique_ptr<Connection>> conns_;
    std::vector<int> peers_;
};

}  // namespace

// SQEs that found the SQ full and the kernel unable to take more (io_uring_enter failing with EBUSY
// while overflowed CQEs cannot be flushed, as older kernels do, or EAGAIN without memory) wait in
// the backlog. A wait() must hand all of them to the kernel before it blocks: one left behind was
// submitted only at the next wait(), so a recv in it saw its data, or a send reached its peer, only
// when some other completion ended the blocking wait (never, on a quiet server). A ring not yet
// enabled takes no SQE either (the first wait() enables it), which is how the test fills the
// backlog: 300 recvs posted before the first wait(), more than the SQ's 256 entries; the last one's
// peer has sent a byte, which the first wait() must deliver at once. Each way of receiving.
TEST_CASE(wait_submits_the_backlog_before_blocking) {
    if (!uring_available()) return testh::kSkip;
    constexpr size_t kConns = 300;
    for (const char* off : {"", "multishot_recv", "pbuf_ring"}) {
        std::printf("  IOCPNATIVE_URING_DISABLE=%s\n", off);
        DisableFeatures guard(off);
        HandDriven h(static_cast<int>(kConns));
        for (size_t i = 0; i < kConns; ++i) h.post_recv(h.conn(i));
        Connection& last = h.conn(kConns - 1);
        ASSERT_EQ(::send(h.peer(kConns - 1), "x", 1, MSG_NOSIGNAL), 1);
        Event ev[128];
        const auto t0 = std::chrono::steady_clock::now();
        int n = h.poller().wait(ev, 128, 2000);
        const auto waited = std::chrono::duration_cast<std::chrono::milliseconds>(
                                std::chrono::steady_clock::now() - t0)
                                .count();
        std::printf("  first wait: %d event(s) after %lld ms\n", n, static_cast<long long>(waited));
        ASSERT_EQ(n, 1);
        ASSERT_TRUE(ev[0].kind == Event::Kind::Recv && ev[0].conn == &last);
        ASSERT_EQ(ev[0].result, 1);
        ASSERT_EQ(ev[0].io->data()[0], 'x');
        ASSERT_LE(waited, 999);
        h.handle(ev[0]);
        ASSERT_TRUE(h.close_all_and_drain());
        ASSERT_EQ(h.pool().in_use(), 0);
    }
    return testh::kPass;
}

TEST_MAIN()
