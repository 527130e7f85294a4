// The server end to end, once per backend available here: byte-exact echo through small
// buffers (many recv completions) and across short sends (a peer that stops reading), many
// clients, and stop() with clients connected and data in flight -> every IoData returned and the
// pool's memory freed.
#include <atomic>
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

#ifdef __linux__
#include <dirent.h>
#include <fcntl.h>

#include <cstdlib>
#include <set>
#endif  // __linux__

using namespace iocpnative;
using testutil::config_for;
using testutil::expect_pool_freed;
using testutil::for_each_backend;
using testutil::random_bytes;

TEST_CASE(echo_is_byte_exact) {
    return for_each_backend([](const std::string& backend) {
        ServerConfig cfg = config_for(backend);
        cfg.buffer_size = 1000;  // every payload spans many IoData buffers
        Server srv(cfg);
        srv.start();
        ASSERT_TRUE(srv.port() != 0);
        // The timeout only guards against a hang: 3 MiB through 1000-byte buffers takes 4-7 s
        // under wine on a slow machine, and 10 s was once too short with another test alongside.
        Client cli("127.0.0.1", srv.port(), 60.0);
        for (size_t n :
             {size_t{1}, size_t{999}, size_t{1000}, size_t{1001}, size_t{65536}, size_t{3} << 20}) {
            const std::string out = random_bytes(n, static_cast<unsigned>(n));
            std::string back(n, '\0');
            cli.request(out.data(), n, &back[0]);
            ASSERT_TRUE(back == out);
        }
        cli.close();
        srv.stop(5.0);
        const ServerStats st = srv.stats();
        ASSERT_EQ(st.bytes_received, st.bytes_sent);
        ASSERT_EQ(st.total_connections, 1);
        expect_pool_freed(srv);
    });
}

// Short sends: a peer that stops reading for a while fills its receive buffer and the server's
// send buffer, so the server's sends complete short (part of an IoData written); the rest must
// follow, in order, with nothing dropped or sent twice. The test above reads while it sends, so
// its sends practically never come back short.
TEST_CASE(echo_is_byte_exact_across_short_sends) {
    return for_each_backend([](const std::string& backend) {
        Server srv(config_for(backend));  // 64 KiB buffers: a send rarely fits exactly
        srv.start();
        Client cli("127.0.0.1", srv.port(), 10.0);
        const std::string out = random_bytes(16u << 20, 11);
        std::string send_error;
        std::thread sender([&] {
            try {
                cli.send(out.data(), out.size());
            } catch (const std::exception& e) {
                send_error = e.what();
            }
        });
        // Not reading: the echo backs up and the server's sends go short (or wait).
        std::this_thread::sleep_for(std::chrono::milliseconds(200));
        std::string back(out.size(), '\0');
        size_t have = 0;
        std::string recv_error;
        try {
            while (have < back.size()) {
                const size_t n = cli.recv(&back[have], back.size() - have);
                if (n == 0) break;
                have += n;
            }
        } catch (const std::exception& e) {
            recv_error = e.what();
        }
        sender.join();
        if (!send_error.empty() || !recv_error.empty()) {
            std::fprintf(stderr, "    send: %s; recv: %s\n", send_error.c_str(),
                         recv_error.c_str());
        }
        ASSERT_EQ(have, out.size());
        ASSERT_TRUE(back == out);
        cli.close();
        srv.stop(5.0);
        const ServerStats st = srv.stats();
        ASSERT_EQ(st.bytes_received, static_cast<int64_t>(out.size()));
        ASSERT_EQ(st.bytes_sent, static_cast<int64_t>(out.size()));
        expect_pool_freed(srv);
    });
}

TEST_CASE(many_clients_concurrently) {
    return for_each_backend([](const std::string& backend) {
        Server srv(config_for(backend));
        srv.start();
        std::atomic<int> ok{0};
        std::vector<std::thread> threads;
        for (int t = 0; t < 8; ++t) {
            threads.emplace_back([&, t] {
                std::vector<std::unique_ptr<Client>> clients;
                for (int i = 0; i < 16; ++i) {
                    clients.push_back(std::make_unique<Client>("127.0.0.1", srv.port(), 10.0));
                }
                for (int round = 0; round < 20; ++round) {
                    for (size_t i = 0; i < clients.size(); ++i) {
                        const std::string msg =
                            random_bytes(100 + i * 37, static_cast<unsigned>(t * 1000 + round));
                        std::string back(msg.size(), '\0');
                        clients[i]->request(msg.data(), msg.size(), &back[0]);
                        if (back == msg) ok.fetch_add(1);
                    }
                }
            });
        }
        for (auto& th : threads) th.join();
        ASSERT_EQ(ok.load(), 8 * 16 * 20);
        ASSERT_EQ(srv.stats().total_connections, 8 * 16);
        srv.stop(5.0);
        expect_pool_freed(srv);
    });
}

TEST_CASE(stop_with_data_in_flight_frees_pool) {
    return for_each_backend([](const std::string& backend) {
        ServerConfig cfg = config_for(backend);
        cfg.buffer_size = 4096;
        Server srv(cfg);
        srv.start();
        // Clients that send a lot and never read: the server's sends block, so IoData are in
        // flight (waiting for socket space) at the moment of stop().
        std::vector<std::unique_ptr<Client>> clients;
        const std::string blob = random_bytes(32u << 20, 7);
        for (int i = 0; i < 8; ++i) {
            clients.push_back(std::make_unique<Client>("127.0.0.1", srv.port(), 0.2));
            try {
                clients.back()->send(blob.data(), blob.size());
            } catch (const TimeoutError&) {
                // The server stopped reading because we do not read: that is the point.
            }
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
        const ServerStats during = srv.stats();
        ASSERT_EQ(during.active_connections, 8);
        ASSERT_GT(during.pool_in_use, 0);
        srv.stop(5.0);
        expect_pool_freed(srv);
        ASSERT_TRUE(!srv.running());
        srv.stop(5.0);  // idempotent
    });
}

TEST_CASE(start_stop_loops) {
    return for_each_backend([](const std::string& backend) {
        for (int i = 0; i < 20; ++i) {
            Server srv(config_for(backend));
            srv.start();
            Client cli("127.0.0.1", srv.port(), 5.0);
            char back[5];
            cli.request("hello", 5, back);
            ASSERT_TRUE(std::memcmp(back, "hello", 5) == 0);
            srv.stop(5.0);
            expect_pool_freed(srv);
        }
    });
}

TEST_CASE(port_in_use_is_eaddrinuse) {
    return for_each_backend([](const std::string& backend) {
        Server a(config_for(backend));
        a.start();
        ServerConfig cfg = config_for(backend);
        cfg.port = a.port();
        Server b(cfg);
        bool raised = false;
        try {
            b.start();
        } catch (const SystemError& e) {
            raised = e.code() == EADDRINUSE;
        }
        ASSERT_TRUE(raised);
        a.stop(5.0);
    });
}

TEST_CASE(max_connections_rejects_extra) {
    return for_each_backend([](const std::string& backend) {
        ServerConfig cfg = config_for(backend);
        cfg.max_connections = 3;
        Server srv(cfg);
        srv.start();
        std::vector<std::unique_ptr<Client>> held;
        for (int i = 0; i < 3; ++i) {
            held.push_back(std::make_unique<Client>("127.0.0.1", srv.port(), 5.0));
            char back[1];
            held.back()->request("x", 1, back);
        }
        Client extra("127.0.0.1", srv.port(), 5.0);
        char buf[16];
        size_t n = 1;
        try {
            n = extra.recv(buf, sizeof(buf));  // closed by the server at once: EOF
        } catch (const SystemError&) {
            n = 0;  // or a reset
        }
        ASSERT_EQ(n, size_t{0});
        ASSERT_EQ(srv.stats().rejected_connections, 1);
        ASSERT_EQ(srv.stats().active_connections, 3);
        srv.stop(5.0);
        expect_pool_freed(srv);
    });
}

namespace {

// Whether srv.start() throws an E.
template <class E>
bool start_throws(Server& srv) {
    try {
        srv.start();
    } catch (const E&) {
        return true;
    }
    return false;
}

}  // namespace

TEST_CASE(start_twice_is_logic_error) {
    Server srv(config_for("auto"));
    srv.start();
    ASSERT_TRUE(start_throws<std::logic_error>(srv));
    srv.stop(5.0);
    return 0;
}

TEST_CASE(unknown_backend_is_invalid_argument) {
    ServerConfig cfg = config_for("kqueue");
    Server srv(cfg);
    ASSERT_TRUE(start_throws<std::invalid_argument>(srv));
    return 0;
}

// A worker count beyond kMaxWorkers is refused before anything is allocated (10^8 workers spent
// a minute building pollers and pools before the system refused a descriptor).
TEST_CASE(too_many_workers_is_invalid_argument) {
    for (int workers : {-1, iocpnative::kMaxWorkers + 1, 100000000}) {
        ServerConfig cfg = config_for("auto");
        cfg.workers = workers;
        Server srv(cfg);
        ASSERT_TRUE(start_throws<std::invalid_argument>(srv));
        ASSERT_TRUE(!srv.running());
    }
    return 0;
}

#ifdef __linux__
namespace {

std::set<int> open_fds() {
    std::set<int> fds;
    DIR* d = ::opendir("/proc/self/fd");
    ASSERT_TRUE(d != nullptr);
    while (const dirent* e = ::readdir(d)) {
        if (e->d_name[0] != '.') fds.insert(std::atoi(e->d_name));
    }
    ::closedir(d);
    return fds;
}

}  // namespace
#endif  // __linux__

// One busy client among idle connections, on the backends with batch waits (Linux): its next
// request cannot arrive before this reply, so a batch wait gathers nothing and must not go on
// holding it. With a 50 ms window, a server that kept batching here answered about 20 requests a
// second.
TEST_CASE(lone_busy_client_is_not_held_by_batch_waits) {
#ifdef __linux__
    return for_each_backend([](const std::string& backend) {
        ServerConfig cfg = config_for(backend);
        cfg.workers = 1;
        cfg.batch_wait_us = 50000;
        Server srv(cfg);
        srv.start();
        std::vector<std::unique_ptr<Client>> idle;
        for (int i = 0; i < 40; ++i) {
            idle.push_back(std::make_unique<Client>("127.0.0.1", srv.port(), 5.0));
            char back[2];
            idle.back()->request("hi", 2, back);
        }
        Client busy("127.0.0.1", srv.port(), 5.0);
        const std::string msg = random_bytes(64, 11);
        std::string back(msg.size(), '\0');
        int done = 0;
        const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(1);
        while (std::chrono::steady_clock::now() < end) {
            busy.request(msg.data(), msg.size(), &back[0]);
            ASSERT_TRUE(back == msg);
            ++done;
        }
        std::printf("  %d requests in 1 s with a 50 ms batch window\n", done);
        ASSERT_TRUE(done >= 200);
        srv.stop(5.0);
        expect_pool_freed(srv);
    });
#else
    return testh::kSkip;  // IOCP has no batch waits
#endif  // __linux__
}

// Every descriptor the server and the client open (listener, accepted connections, the client's
// socket, epoll/eventfd/ring) is close-on-exec: a child process started meanwhile must not keep
// the port bound or a connection open. Windows: test_iocp's
// child_process_inherits_no_server_socket.
TEST_CASE(no_descriptor_is_inherited) {
#ifdef __linux__
    return for_each_backend([](const std::string& backend) {
        const std::set<int> before = open_fds();
        Server srv(config_for(backend));
        srv.start();
        Client cli("127.0.0.1", srv.port(), 10.0);
        char back[2];
        cli.request("hi", 2, back);
        int checked = 0;
        for (int fd : open_fds()) {
            if (before.count(fd) != 0) continue;
            const int flags = ::fcntl(fd, F_GETFD);
            if (flags < 0) continue;  // the directory's own descriptor, closed since
            ASSERT_TRUE((flags & FD_CLOEXEC) != 0);
            ++checked;
        }
        std::printf("  %d new descriptors, all close-on-exec\n", checked);
        ASSERT_GE(checked, 3);  // at least the listener and both ends of the connection
        cli.close();
        srv.stop(5.0);
        expect_pool_freed(srv);
    });
#else
    return testh::kSkip;
#endif  // __linux__
}

TEST_MAIN()
