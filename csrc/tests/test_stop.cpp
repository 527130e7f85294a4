// stop() at its edges, once per backend available here: several threads calling stop() at once
// (only one may join the workers), and timeouts so large that converting them to clock ticks or
// milliseconds would overflow (they mean "never").
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#ifndef _WIN32
#include <pthread.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <fstream>
#endif

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

// A forked child (os.fork, multiprocessing, the fork before an exec) holds a copy of every
// socket. When the server then closes a connection, the socket itself stays open in the child,
// and so did the connection's epoll registration (it belongs to the open socket, not to the
// descriptor number): data arriving later was reported with the freed Connection (a
// use-after-free under ASan). Now the registration is removed before the close.
TEST_CASE(close_while_a_forked_child_holds_the_socket) {
#ifdef _WIN32
    return testh::kSkip;  // no fork() on Windows
#else
    return for_each_backend([](const std::string& backend) {
        ServerConfig cfg = config_for(backend);
        cfg.workers = 1;
        cfg.idle_timeout = 0.2;
        Server srv(cfg);
        srv.start();
        Client a("127.0.0.1", srv.port(), 5.0);
        char back[5];
        a.request("first", 5, back);
        // The child holds its copies of the sockets until the parent closes `hold` (its read
        // then returns 0), so however slow this machine, they outlive the idle close.
        int hold[2];
        ASSERT_EQ(::pipe(hold), 0);
        const pid_t child = ::fork();
        if (child == 0) {
            ::close(hold[1]);
            char ch;
            while (::read(hold[0], &ch, 1) < 0 && errno == EINTR) {
            }
            ::_exit(0);
        }
        ASSERT_TRUE(child > 0);
        ::close(hold[0]);
        testutil::wait_until([&] { return srv.stats().active_connections == 0; },
                             5.0);  // idle close
        ASSERT_EQ(srv.stats().active_connections, 0);
        a.send("late", 4);  // reaches the socket the child still holds
        std::this_thread::sleep_for(std::chrono::milliseconds(200));
        Client b("127.0.0.1", srv.port(), 5.0);
        b.request("after", 5, back);
        ASSERT_TRUE(std::memcmp(back, "after", 5) == 0);
        srv.stop(5.0);
        expect_pool_freed(srv);
        ::close(hold[1]);
        int status = 0;
        ASSERT_EQ(::waitpid(child, &status, 0), child);
    });
#endif
}

// start() when a worker thread cannot be created (here: an address-space limit that leaves room
// for one more thread stack, not for two). It used to leave running() true and every stop()
// waiting for the worker that never started. Now start() stops the workers it did start, frees
// everything and raises the thread error. Run in a child: the limit must not reach the others.
// The spawn loop is the core's, the same for every backend; epoll's pollers need no memory that
// the limit would refuse first.
#if !defined(_WIN32) && !defined(IOCPNATIVE_TEST_SANITIZED)
static long vm_size_kib() {
    std::ifstream in("/proc/self/status");
    std::string key;
    long kib = -1;
    while (in >> key) {
        if (key == "VmSize:") {
            in >> kib;
            break;
        }
        in.ignore(1 << 12, '\n');
    }
    return kib;
}
#endif

TEST_CASE(start_without_a_worker_thread_fails_cleanly) {
#if defined(_WIN32) || defined(IOCPNATIVE_TEST_SANITIZED)
    // The test limits the address space with setrlimit, in a forked child. Under ASan or TSan the
    // sanitizer's own per-thread memory (ASan's fake stacks: 11 MB a thread) is refused first,
    // and the runtime aborts; the plain builds (nox -s test, CTest) run it.
    return testh::kSkip;
#else
    const auto names = testh::backends_under_test(available_backends());
    if (std::find(names.begin(), names.end(), "epoll") == names.end()) return testh::kSkip;
    const pid_t child = ::fork();
    if (child == 0) {
        // The default thread stack (8 MiB here; 2 MiB with an unlimited stack rlimit): the limit
        // leaves room for one and a half more. glibc keeps up to 40 MiB of stacks of finished
        // threads for reuse, already counted in VmSize (test_stop --all runs other servers
        // first), so there are enough workers to use those up and then need two new stacks.
        pthread_attr_t attr;
        size_t stack = 0;
        if (::pthread_getattr_default_np(&attr) != 0 ||
            ::pthread_attr_getstacksize(&attr, &stack) != 0 || stack == 0) {
            ::_exit(19);
        }
        ::pthread_attr_destroy(&attr);
        ServerConfig cfg = config_for("epoll");
        cfg.workers = 3 + static_cast<int>((size_t{40} << 20) / stack);
        const long kib = vm_size_kib();
        if (kib <= 0) ::_exit(10);
        const rlim_t limit = static_cast<rlim_t>(kib) * 1024 + stack + stack / 2;
        const rlimit rl{limit, limit};
        if (::setrlimit(RLIMIT_AS, &rl) != 0) ::_exit(11);
        Server srv(cfg);
        int code = 0;
        try {
            srv.start();
            ::_exit(12);  // every thread started: the limit did not bite
        } catch (const SystemError& e) {
            code = e.code();
            std::printf("    start: %s\n", e.what());
            // At least one worker started, so the "stop those that did" path ran too.
            if (std::strstr(e.what(), "worker thread 1 of") != nullptr) ::_exit(20);
        } catch (...) {
            ::_exit(13);
        }
        if (code != EAGAIN && code != ENOMEM) ::_exit(14);
        if (srv.running()) ::_exit(15);
        const auto t0 = std::chrono::steady_clock::now();
        try {
            srv.stop(5.0);
        } catch (...) {
            ::_exit(16);
        }
        if (std::chrono::steady_clock::now() - t0 > std::chrono::seconds(1)) ::_exit(17);
        const ServerStats st = srv.stats();
        if (st.pool_in_use != 0 || st.pool_allocated != 0 || st.active_connections != 0)
            ::_exit(18);
        std::fflush(stdout);
        ::_exit(0);
    }
    ASSERT_TRUE(child > 0);
    int status = 0;
    ASSERT_EQ(::waitpid(child, &status, 0), child);
    if (!WIFEXITED(status)) std::printf("    child died: status %d\n", status);
    ASSERT_TRUE(WIFEXITED(status));
    ASSERT_EQ(WEXITSTATUS(status), 0);
    return testh::kPass;
#endif
}

TEST_MAIN()
