// The DataHandler path of the core, once per backend available here, with a C++ handler:
// replies produced per chunk (larger than one IoData, or empty), handler errors closing only
// their connection, on_connect/on_disconnect pairing, the idle timeout, and stop() while a
// handler blocks.
#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
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

// Each received byte b comes back as `repeat` copies of toupper(b); '!' is a handler error and
// '?' is swallowed (no reply). Byte-wise, so the replies do not depend on how reads split.
class Expander final : public DataHandler {
  public:
    explicit Expander(size_t repeat) : repeat_(repeat) {}
    bool on_data(uint64_t, const char* data, size_t len, std::string& out) override {
        for (size_t i = 0; i < len; ++i) {
            if (data[i] == '!') return false;
            if (data[i] == '?') continue;
            out.append(repeat_,
                       static_cast<char>(std::toupper(static_cast<unsigned char>(data[i]))));
        }
        return true;
    }
    void on_batch(DataChunk* chunks, size_t n, const std::atomic<bool>& stopping) override {
        batches.fetch_add(1);
        chunk_count.fetch_add(static_cast<int64_t>(n));
        DataHandler::on_batch(chunks, n, stopping);
    }
    bool on_connect(uint64_t, const std::string& peer) override {
        if (peer.find(':') == std::string::npos) return false;
        connects.fetch_add(1);
        return true;
    }
    bool on_disconnect(uint64_t) override {
        disconnects.fetch_add(1);
        return true;
    }
    std::atomic<int64_t> batches{0}, chunk_count{0}, connects{0}, disconnects{0};

  private:
    const size_t repeat_;
};

std::string expand(const std::string& in, size_t repeat) {
    std::string out;
    for (char ch : in) {
        if (ch != '?')
            out.append(repeat, static_cast<char>(std::toupper(static_cast<unsigned char>(ch))));
    }
    return out;
}

}  // namespace

TEST_CASE(handler_replies_larger_than_buffer_in_order) {
    return for_each_backend([](const std::string& backend) {
        auto h = std::make_shared<Expander>(4096);
        Server srv(config_for(backend, 16), h);
        srv.start();
        Client cli("127.0.0.1", srv.port(), 10.0);
        for (const std::string msg : {"abcdefghijklmnop", "q?r", "0123456789ABCDEFxyz"}) {
            const std::string want = expand(msg, 4096);
            cli.send(msg.data(), msg.size());
            std::string got(want.size(), '\0');
            size_t have = 0;
            while (have < got.size()) have += cli.recv(&got[have], got.size() - have);
            ASSERT_TRUE(got == want);
        }
        cli.close();
        ASSERT_TRUE(wait_until([&] { return h->disconnects.load() == 1; }, 10.0));
        srv.stop(5.0);
        ASSERT_EQ(h->connects.load(), 1);
        ASSERT_EQ(srv.stats().handler_errors, 0);
        ASSERT_TRUE(h->chunk_count.load() >= h->batches.load());
        expect_pool_freed(srv);
    });
}

TEST_CASE(handler_error_closes_only_its_connection) {
    return for_each_backend([](const std::string& backend) {
        auto h = std::make_shared<Expander>(1);
        Server srv(config_for(backend, 4096), h);
        srv.start();
        Client good("127.0.0.1", srv.port(), 10.0);
        Client bad("127.0.0.1", srv.port(), 10.0);
        char back[8];
        good.request("ok", 2, back);
        ASSERT_TRUE(std::memcmp(back, "OK", 2) == 0);
        bad.send("x!", 2);
        size_t n = 1;
        try {
            n = bad.recv(back, sizeof(back));
        } catch (const SystemError&) {
            n = 0;  // a reset is as good as EOF here
        }
        ASSERT_EQ(n, size_t{0});
        ASSERT_TRUE(wait_until([&] { return srv.stats().handler_errors == 1; }, 10.0));
        good.request("go", 2, back);
        ASSERT_TRUE(std::memcmp(back, "GO", 2) == 0);
        srv.stop(5.0);
        ASSERT_EQ(h->connects.load(), 2);
        ASSERT_EQ(h->disconnects.load(), 2);
        expect_pool_freed(srv);
    });
}

// A C++ handler that throws: 'T' in the data throws std::runtime_error, 'B' std::bad_alloc;
// on_connect throws while connect_throws is set, on_disconnect while disconnect_throws is.
class Thrower final : public DataHandler {
  public:
    bool on_data(uint64_t, const char* data, size_t len, std::string& out) override {
        const std::string in(data, len);
        if (in.find('T') != std::string::npos) throw std::runtime_error("T in the data");
        if (in.find('B') != std::string::npos) throw std::bad_alloc();
        out = in;
        return true;
    }
    bool on_connect(uint64_t, const std::string&) override {
        if (connect_throws.load()) throw std::runtime_error("refused by on_connect");
        return true;
    }
    bool on_disconnect(uint64_t) override {
        disconnects.fetch_add(1);
        if (disconnect_throws.load()) throw std::runtime_error("on_disconnect failed");
        return true;
    }
    std::atomic<bool> connect_throws{false}, disconnect_throws{false};
    std::atomic<int64_t> disconnects{0};
};

size_t recv_or_reset(Client& c, char* buf, size_t n) {
    try {
        return c.recv(buf, n);
    } catch (const SystemError&) {
        return 0;  // a reset is as good as EOF here
    }
}

// An exception out of a handler used to escape the worker's loop: the worker stopped for good
// (later clients hung), and the staged buffers and connections stayed in use after stop(). Now it
// counts as a handler error on that connection alone.
TEST_CASE(handler_exceptions_close_only_their_connection) {
    return for_each_backend([](const std::string& backend) {
        auto h = std::make_shared<Thrower>();
        ServerConfig cfg = config_for(backend, 4096);
        cfg.workers = 1;  // one worker: if it died, nothing would answer
        Server srv(cfg, h);
        srv.start();
        Client good("127.0.0.1", srv.port(), 10.0);
        char back[8];
        good.request("ok", 2, back);
        for (const char* poison : {"xT", "B"}) {
            Client bad("127.0.0.1", srv.port(), 10.0);
            bad.send(poison, std::strlen(poison));
            ASSERT_EQ(recv_or_reset(bad, back, sizeof(back)), size_t{0});
            good.request("go", 2, back);
            ASSERT_TRUE(std::memcmp(back, "go", 2) == 0);
        }
        h->connect_throws = true;
        {
            Client refused("127.0.0.1", srv.port(), 10.0);
            ASSERT_EQ(recv_or_reset(refused, back, sizeof(back)), size_t{0});
        }
        h->connect_throws = false;
        // Two poisoned connections and the refused one, all closed and gone.
        ASSERT_TRUE(wait_until(
            [&] { return srv.stats().handler_errors == 3 && h->disconnects.load() == 3; }, 10.0));
        h->disconnect_throws = true;
        good.close();
        ASSERT_TRUE(wait_until([&] { return srv.stats().handler_errors == 4; }, 10.0));
        Client after("127.0.0.1", srv.port(), 10.0);
        after.request("end", 3, back);
        ASSERT_TRUE(std::memcmp(back, "end", 3) == 0);
        srv.stop(5.0);
        ASSERT_EQ(h->disconnects.load(), 5);
        expect_pool_freed(srv);
    });
}

// idle_timeout counts data that goes to a handler as activity, as on the echo path: a connection
// that keeps talking to its handler for several timeouts stays open, a silent one is closed.
TEST_CASE(idle_timeout_spares_a_busy_handler_connection) {
    return for_each_backend([](const std::string& backend) {
        auto h = std::make_shared<Expander>(1);
        ServerConfig cfg = config_for(backend, 4096);
        cfg.workers = 1;
        cfg.idle_timeout = 0.3;
        Server srv(cfg, h);
        srv.start();
        Client busy("127.0.0.1", srv.port(), 5.0);
        Client quiet("127.0.0.1", srv.port(), 5.0);
        char back[2];
        int rounds = 0;
        std::string error;
        const auto t0 = std::chrono::steady_clock::now();
        try {
            while (std::chrono::steady_clock::now() - t0 < std::chrono::milliseconds(1000)) {
                busy.request("ab", 2, back);
                ASSERT_TRUE(std::memcmp(back, "AB", 2) == 0);
                ++rounds;
                std::this_thread::sleep_for(std::chrono::milliseconds(20));
            }
        } catch (const std::exception& e) {
            error = e.what();
        }
        if (!error.empty()) {
            std::fprintf(stderr, "    busy connection, round %d: %s\n", rounds, error.c_str());
        }
        ASSERT_TRUE(error.empty());
        ASSERT_EQ(recv_or_reset(quiet, back, sizeof(back)), size_t{0});  // closed as idle
        ASSERT_EQ(srv.stats().active_connections, 1);
        srv.stop(5.0);
        ASSERT_EQ(h->connects.load(), 2);
        ASSERT_EQ(h->disconnects.load(), 2);
        ASSERT_EQ(srv.stats().handler_errors, 0);
        expect_pool_freed(srv);
    });
}

TEST_CASE(stop_while_handler_blocks_times_out_then_completes) {
    return for_each_backend([](const std::string& backend) {
        auto h = std::make_shared<testutil::Blocker>();
        ServerConfig cfg = config_for(backend, 4096);
        cfg.workers = 1;
        Server srv(cfg, h);
        srv.start();
        Client cli("127.0.0.1", srv.port(), 10.0);
        cli.send("hold", 4);
        h->wait_entered();
        bool timed_out = false;
        try {
            srv.stop(0.1);
        } catch (const TimeoutError&) {
            timed_out = true;
        }
        ASSERT_TRUE(timed_out);
        h->release();
        srv.stop(5.0);
        ASSERT_TRUE(!srv.running());
        expect_pool_freed(srv);
    });
}

TEST_MAIN()
