// One load-generator thread: connects its slice of the connections, primes each with one
// unmeasured echo, waits for the common start, then runs the ping-pong (or fixed-rate) loop
// until the end of the measured window. See loadgen.hpp for the method.
//
// Linux: one edge-triggered epoll set per thread, every socket registered once for
// EPOLLIN|EPOLLOUT|EPOLLRDHUP, so no epoll_ctl per message; epoll_pwait2 (Linux >= 5.11) gives
// the fixed-rate schedule a ns timeout, else epoll_wait rounds up to whole ms. Windows: WSAPoll
// (Vista and later) over the thread's sockets, level-triggered, rebuilt on every wait.
#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>

#include "../core/net.hpp"
#include "iocpnative/errors.hpp"
#include "loadgen_runner.hpp"

#ifdef _WIN32
#include <mswsock.h>
#else
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#endif  // _WIN32

namespace iocpnative {
namespace loadgen {

namespace {

constexpr int kMaxConnecting = 256;             // handshakes in flight per thread
constexpr int64_t kTickNs = 100 * 1000 * 1000;  // longest sleep: abort/stall checks
constexpr int64_t kConnectTickNs = 50 * 1000 * 1000;
constexpr size_t kReadBuffer = 256 * 1024;
constexpr uint64_t kNoLimit = std::numeric_limits<uint64_t>::max();

bool would_block(int err) {
    return err == EAGAIN || err == EWOULDBLOCK;
}

// CPU time of the calling thread, s.
double thread_cpu_s() noexcept {
#ifdef _WIN32
    FILETIME created, exited, kernel, user;
    if (!GetThreadTimes(GetCurrentThread(), &created, &exited, &kernel, &user)) return 0.0;
    auto ticks = [](const FILETIME& f) {
        return (static_cast<uint64_t>(f.dwHighDateTime) << 32) | f.dwLowDateTime;
    };
    return static_cast<double>(ticks(kernel) + ticks(user)) * 1e-7;  // 100 ns units
#else
    timespec ts{};
    if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) != 0) return 0.0;
    return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
#endif  // _WIN32
}

enum class State : uint8_t { New, Connecting, Open, Closed };

struct Conn {
    socket_t fd = kInvalidSocket;
    uint32_t gid = 0;    // global connection id (payload and rate schedule)
    uint32_t local = 0;  // index in this runner's arrays
    State state = State::New;
    bool sending = false;  // the newest message is partly written
    bool bad_cur = false;  // the message being received is already counted as corrupt
    size_t send_off = 0;   // bytes of the newest message written
    size_t recv_off = 0;   // bytes of message `recvd` received
    uint64_t sent = 0;     // messages started
    uint64_t recvd = 0;    // messages fully echoed
    uint64_t limit = 1;    // messages that may be started (1 while priming)
    uint64_t rate_base = 0;
};

class Runner {
  public:
    Runner(SharedRun& run, const std::vector<uint32_t>& ids, RunnerCounters& counters,
           RunnerResult& out);
    ~Runner();
    void run();

  private:
    void open_poller();
    void connect_and_prime();
    void start_connect(Conn& c);
    void give_up_setup();
    void wait_for_start();
    void load();
    void rate_poke(int64_t now, int64_t& wake);
    int64_t slot_due(uint64_t slot) const;
    void poll_once(int64_t timeout_ns);
    void on_event(Conn& c, bool readable, bool writable, bool hangup);
    void finish_connect(Conn& c, bool failed);
    bool do_read(Conn& c, bool hangup);
    bool try_send(Conn& c);
    void process(Conn& c, const char* p, size_t n);
    void completed(Conn& c, size_t slot);
    void check_stalls(int64_t now);
    void fail(Conn& c, LoadError kind, const std::string& detail);
    void count_error(LoadError kind, const std::string& detail);
    void close_conn(Conn& c);

    SharedRun& run_;
    const LoadConfig& cfg_;
    const Payload& payload_;
    RunnerCounters& counters_;
    RunnerResult& out_;
    const size_t size_;
    const uint64_t pipeline_;
    std::vector<Conn> conns_;
    std::vector<size_t> slot_off_;      // [local * pipeline + slot] payload offset
    std::vector<int64_t> slot_origin_;  // latency origin: send time, or the scheduled time
    std::vector<int64_t> slot_sent_;    // actual send time (stall detection)
    std::vector<char> rbuf_;
    int connecting_ = 0;
    int open_ = 0;
    int waiting_prime_ = 0;  // open connections whose priming echo is not back yet
    bool may_send_ = true;   // new messages may start (false once the window has ended)
    bool priming_ = true;
    int64_t warm_end_ = 0;
    int64_t end_ = 0;
    uint64_t window_rt_ = 0;
    uint64_t all_rt_ = 0;
    uint64_t errors_ = 0;
    // Fixed rate: local slot n is message n / size() of conns_[n % size()].
    bool rate_on_ = false;
    double period_ns_ = 0.0;
    int64_t rate_t0_ = 0;
    uint64_t cursor_ = 0;
#ifdef _WIN32
    std::vector<WSAPOLLFD> pfds_;
    std::vector<Conn*> pconns_;
#else
    int ep_ = -1;
    bool have_pwait2_ = true;
#endif  // _WIN32
};

Runner::Runner(SharedRun& run, const std::vector<uint32_t>& ids, RunnerCounters& counters,
               RunnerResult& out)
    : run_(run),
      cfg_(*run.cfg),
      payload_(*run.payload),
      counters_(counters),
      out_(out),
      size_(run.cfg->size),
      pipeline_(static_cast<uint64_t>(run.cfg->pipeline)),
      conns_(ids.size()),
      slot_off_(ids.size() * static_cast<size_t>(run.cfg->pipeline)),
      slot_origin_(slot_off_.size()),
      slot_sent_(slot_off_.size()),
      rbuf_(kReadBuffer) {
    for (size_t i = 0; i < ids.size(); ++i) {
        conns_[i].gid = ids[i];
        conns_[i].local = static_cast<uint32_t>(i);
    }
}

Runner::~Runner() {
    for (Conn& c : conns_) net::close_socket(c.fd);
#ifndef _WIN32
    if (ep_ >= 0) ::close(ep_);
#endif  // _WIN32
}

void Runner::run() {
    open_poller();
    connect_and_prime();
    wait_for_start();
    if (!run_.abort.load(std::memory_order_relaxed)) load();
    may_send_ = false;
    for (Conn& c : conns_) close_conn(c);
}

void Runner::open_poller() {
#ifndef _WIN32
    ep_ = ::epoll_create1(EPOLL_CLOEXEC);
    if (ep_ < 0) throw make_system_error(errno, "epoll_create1");
#endif  // _WIN32
}

// Connect (at most kMaxConnecting pending) and prime: each connection sends its first message
// as soon as it is connected (limit = 1). Ends when every connection is primed or failed, or at
// the connect deadline.
void Runner::connect_and_prime() {
    size_t next = 0;
    while (!run_.abort.load(std::memory_order_relaxed)) {
        while (next < conns_.size() && connecting_ < kMaxConnecting) start_connect(conns_[next++]);
        if (next == conns_.size() && connecting_ == 0 && waiting_prime_ == 0) break;
        const int64_t now = now_ns();
        if (now >= run_.connect_deadline_ns) {
            give_up_setup();
            break;
        }
        poll_once(std::min(run_.connect_deadline_ns - now, kConnectTickNs));
        check_stalls(now_ns());
    }
    priming_ = false;
    out_.primed = open_;
    counters_.ready.store(true, std::memory_order_release);
}

void Runner::give_up_setup() {
    for (Conn& c : conns_) {
        if (c.state == State::New) {
            count_error(LoadError::ConnectFailed, "not started within the connect timeout");
            c.state = State::Closed;
        } else if (c.state == State::Connecting) {
            fail(c, LoadError::ConnectFailed, "connect timed out");
        } else if (c.state == State::Open && c.recvd == 0) {
            fail(c, LoadError::Stalled, "no echo of the first message within the connect timeout");
        }
    }
}

void Runner::start_connect(Conn& c) {
    const auto& addr = run_.addr;
    socket_t s = net::open_socket(addr.ss_family, SOCK_STREAM, IPPROTO_TCP);
    if (s == kInvalidSocket) {
        c.state = State::Closed;
        return count_error(LoadError::ConnectFailed,
                           make_system_error(last_socket_error(), "socket").what());
    }
    c.fd = s;
    c.state = State::Connecting;
    ++connecting_;
    int err = net::set_nonblocking(s, true);
    if (err != 0) return fail(c, LoadError::ConnectFailed, std::strerror(err));
    net::set_nodelay(s);
#ifndef _WIN32
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
    ev.data.ptr = &c;
    if (::epoll_ctl(ep_, EPOLL_CTL_ADD, s, &ev) != 0) {
        return fail(c, LoadError::Other, make_system_error(errno, "epoll_ctl").what());
    }
#endif  // _WIN32
    if (::connect(s, reinterpret_cast<const sockaddr*>(&addr), run_.addr_len) == 0) {
        return finish_connect(c, false);
    }
    err = last_socket_error();
    if (err == EINPROGRESS || would_block(err)) return;  // completes on writability
    fail(c, LoadError::ConnectFailed, make_system_error(err, "connect").what());
}

void Runner::finish_connect(Conn& c, bool failed) {
    int so_err = 0;
    socklen_t len = sizeof(so_err);
    if (::getsockopt(c.fd, SOL_SOCKET, SO_ERROR, reinterpret_cast<char*>(&so_err), &len) != 0) {
        so_err = last_socket_error();
    }
    so_err = errno_from_native(so_err);
    if (failed && so_err == 0) so_err = ECONNREFUSED;
    if (so_err != 0) {
        return fail(c, LoadError::ConnectFailed, make_system_error(so_err, "connect").what());
    }
    --connecting_;
    c.state = State::Open;
    ++open_;
    ++waiting_prime_;
    counters_.open.store(open_, std::memory_order_relaxed);
    try_send(c);
}

void Runner::wait_for_start() {
    while (run_.start_ns.load(std::memory_order_acquire) == 0 &&
           !run_.abort.load(std::memory_order_relaxed)) {
        poll_once(200 * 1000);  // nothing is outstanding: only a reset or EOF can arrive
    }
}

void Runner::load() {
    const int64_t t0 = run_.start_ns.load(std::memory_order_acquire);
    warm_end_ = run_.warm_end_ns();
    end_ = run_.end_ns();
    rate_on_ = cfg_.rate > 0 && !conns_.empty();
    if (rate_on_) {
        period_ns_ = 1e9 / cfg_.rate;
        rate_t0_ = t0;
    }
    for (Conn& c : conns_) {
        c.limit = kNoLimit;
        c.rate_base = c.sent;
    }
    for (Conn& c : conns_) {
        if (c.state == State::Open) try_send(c);
    }
    bool measuring = false;
    double cpu0 = 0.0;
    int64_t next_stall_check = t0 + kTickNs;
    while (!run_.abort.load(std::memory_order_relaxed)) {
        const int64_t now = now_ns();
        if (!measuring && now >= warm_end_) {
            measuring = true;
            cpu0 = thread_cpu_s();
        }
        if (now >= end_ || (open_ == 0 && connecting_ == 0)) break;
        int64_t wake = std::min(measuring ? end_ : warm_end_, now + kTickNs);
        if (rate_on_) rate_poke(now, wake);
        if (now >= next_stall_check) {
            check_stalls(now);
            next_stall_check = now + kTickNs;
        }
        poll_once(wake - now);
    }
    if (measuring) out_.window_cpu_s = thread_cpu_s() - cpu0;
}

int64_t Runner::slot_due(uint64_t slot) const {
    const uint64_t n = conns_.size();
    const uint64_t global = (slot / n) * static_cast<uint64_t>(cfg_.connections) +
                            conns_[static_cast<size_t>(slot % n)].gid;
    return rate_t0_ + static_cast<int64_t>(static_cast<double>(global) * period_ns_);
}

// Pokes every connection whose slot is due (try_send sends what it may) and lowers `wake` to
// the next slot. The slots of one runner are visited in time order (the ids are increasing).
void Runner::rate_poke(int64_t now, int64_t& wake) {
    // Behind by more than a round of the schedule (every connection's slot came and went): each
    // connection keeps its own count of the messages due (try_send), so one round of pokes does
    // what visiting every missed slot did. Without the jump a rate the thread could not keep up
    // with kept it here for good, past the end of the run and deaf to Ctrl-C.
    const uint64_t n = conns_.size();
    const double round_ns = period_ns_ * cfg_.connections;
    if (now > rate_t0_) {
        const double behind = static_cast<double>(now - rate_t0_) / round_ns;
        if (behind >= 2.0 && behind < 1e18) {
            const uint64_t round = static_cast<uint64_t>(behind) - 1;
            if (cursor_ / n < round) cursor_ = round * n;
        }
    }
    for (;;) {
        const int64_t due = slot_due(cursor_);
        if (due > now) {
            wake = std::min(wake, due);
            return;
        }
        Conn& c = conns_[static_cast<size_t>(cursor_ % conns_.size())];
        if (c.state == State::Open) try_send(c);
        ++cursor_;
    }
}

void Runner::poll_once(int64_t timeout_ns) {
    if (timeout_ns < 0) timeout_ns = 0;
#ifdef _WIN32
    pfds_.clear();
    pconns_.clear();
    for (Conn& c : conns_) {
        if (c.state != State::Connecting && c.state != State::Open) continue;
        WSAPOLLFD p{};
        p.fd = c.fd;
        p.events = POLLRDNORM;
        if (c.state == State::Connecting || c.sending) p.events |= POLLWRNORM;
        pfds_.push_back(p);
        pconns_.push_back(&c);
    }
    const int ms = static_cast<int>((timeout_ns + 999999) / 1000000);
    if (pfds_.empty()) {
        Sleep(static_cast<DWORD>(ms));
        return;
    }
    const int n = ::WSAPoll(pfds_.data(), static_cast<ULONG>(pfds_.size()), ms);
    if (n < 0) throw make_system_error(last_socket_error(), "WSAPoll");
    for (size_t i = 0; i < pfds_.size() && n > 0; ++i) {
        const short r = pfds_[i].revents;
        if (r == 0) continue;
        const bool hup = (r & (POLLERR | POLLHUP | POLLNVAL)) != 0;
        on_event(*pconns_[i], (r & POLLRDNORM) != 0, (r & POLLWRNORM) != 0, hup);
    }
#else
    epoll_event evs[256];
    int n = -1;
#ifdef SYS_epoll_pwait2
    if (have_pwait2_) {
        timespec ts{};
        ts.tv_sec = static_cast<time_t>(timeout_ns / 1000000000);
        ts.tv_nsec = static_cast<long>(timeout_ns % 1000000000);
        n = static_cast<int>(::syscall(SYS_epoll_pwait2, ep_, evs, 256, &ts, nullptr, 0));
        if (n < 0 && errno == ENOSYS) have_pwait2_ = false;
    }
#else
    have_pwait2_ = false;
#endif  // SYS_epoll_pwait2
    if (!have_pwait2_) {
        n = ::epoll_wait(ep_, evs, 256, static_cast<int>((timeout_ns + 999999) / 1000000));
    }
    if (n < 0) {
        if (errno == EINTR) return;
        throw make_system_error(errno, "epoll_wait");
    }
    for (int i = 0; i < n; ++i) {
        const uint32_t e = evs[i].events;
        on_event(*static_cast<Conn*>(evs[i].data.ptr), (e & (EPOLLIN | EPOLLRDHUP)) != 0,
                 (e & EPOLLOUT) != 0, (e & (EPOLLERR | EPOLLHUP)) != 0);
    }
#endif  // _WIN32
}

void Runner::on_event(Conn& c, bool readable, bool writable, bool hangup) {
    if (c.state == State::Connecting) {
        if (!writable && !hangup) return;
        finish_connect(c, hangup && !writable);
        if (c.state != State::Open) return;
    }
    if (c.state != State::Open) return;
    if ((readable || hangup) && !do_read(c, hangup)) return;
    try_send(c);  // writable, or an answer completed and the next message may go
}

// Reads until drained. Returns false when the connection is gone.
bool Runner::do_read(Conn& c, bool hangup) {
    for (;;) {
        const auto n = ::recv(c.fd, rbuf_.data(), static_cast<io_len_t>(rbuf_.size()), 0);
        if (n > 0) {
            process(c, rbuf_.data(), static_cast<size_t>(n));
            if (c.state != State::Open) return false;
            // A short read drained the socket; a later arrival raises a new edge. After a
            // hang-up keep reading so the EOF is seen now.
            if (static_cast<size_t>(n) < rbuf_.size() && !hangup) return true;
            continue;
        }
        if (n == 0) {
            if (may_send_ || c.sent != c.recvd) {
                fail(c, LoadError::UnexpectedEof, "the server closed the connection");
            } else {
                close_conn(c);
            }
            return false;
        }
        const int err = last_socket_error();
        if (would_block(err)) return true;
        if (err == EINTR) continue;
        fail(c, err == ECONNRESET ? LoadError::Reset : LoadError::Other,
             make_system_error(err, "recv").what());
        return false;
    }
}

// Writes what may be written: the rest of a partly written message, then new messages while
// fewer than `pipeline` are in flight (and, at a fixed rate, while they are due).
bool Runner::try_send(Conn& c) {
    for (;;) {
        if (c.sending) {
            const size_t slot = c.local * pipeline_ + (c.sent - 1) % pipeline_;
            const char* p = payload_.at(slot_off_[slot]) + c.send_off;
            const auto n = ::send(c.fd, p, static_cast<io_len_t>(size_ - c.send_off), kSendFlags);
            if (n > 0) {
                c.send_off += static_cast<size_t>(n);
                if (c.send_off == size_) c.sending = false;
                continue;
            }
            const int err = n < 0 ? last_socket_error() : EIO;
            if (would_block(err)) return true;
            if (err == EINTR) continue;
            const bool reset = err == ECONNRESET || err == EPIPE || err == ECONNABORTED;
            fail(c, reset ? LoadError::Reset : LoadError::Other,
                 make_system_error(err, "send").what());
            return false;
        }
        if (!may_send_ || c.sent - c.recvd >= pipeline_ || c.sent >= c.limit) return true;
        const int64_t now = now_ns();
        int64_t origin = now;
        if (rate_on_) {
            const uint64_t m = c.sent - c.rate_base;
            origin = rate_t0_ +
                     static_cast<int64_t>(
                         static_cast<double>(m * static_cast<uint64_t>(cfg_.connections) + c.gid) *
                         period_ns_);
            if (origin > now) return true;  // not before its time; rate_poke comes back
        }
        const size_t slot = c.local * pipeline_ + c.sent % pipeline_;
        slot_off_[slot] = payload_.offset(c.gid, c.sent);
        slot_origin_[slot] = origin;
        slot_sent_[slot] = now;
        ++c.sent;
        c.send_off = 0;
        c.sending = true;
    }
}

// Checks arrived bytes against the messages in flight, in order.
void Runner::process(Conn& c, const char* p, size_t n) {
    while (n > 0) {
        if (c.recvd >= c.sent) {
            count_error(LoadError::Excess, "connection " + std::to_string(c.gid) + ": " +
                                               std::to_string(n) + " bytes that were never sent");
            return;
        }
        const size_t slot = c.local * pipeline_ + c.recvd % pipeline_;
        const size_t take = std::min(size_ - c.recv_off, n);
        // Bytes of the newest message cannot come back before they were written.
        const bool ahead = c.recvd + 1 == c.sent && c.sending && c.recv_off + take > c.send_off;
        if (!c.bad_cur &&
            (ahead || std::memcmp(payload_.at(slot_off_[slot]) + c.recv_off, p, take) != 0)) {
            c.bad_cur = true;
            count_error(
                LoadError::Corrupt,
                "connection " + std::to_string(c.gid) + ": message " + std::to_string(c.recvd) +
                    (ahead ? " echoed ahead of what was sent" : " echoed with wrong bytes"));
        }
        c.recv_off += take;
        p += take;
        n -= take;
        if (c.recv_off == size_) completed(c, slot);
    }
}

void Runner::completed(Conn& c, size_t slot) {
    const int64_t t = now_ns();
    ++all_rt_;
    if (t >= warm_end_ && t < end_ && !priming_) {
        ++window_rt_;
        out_.hist.add(static_cast<uint64_t>(t - slot_origin_[slot]));
        counters_.window_round_trips.store(window_rt_, std::memory_order_relaxed);
    }
    counters_.all_round_trips.store(all_rt_, std::memory_order_relaxed);
    if (c.recvd == 0 && priming_) --waiting_prime_;
    ++c.recvd;
    c.recv_off = 0;
    c.bad_cur = false;
}

// An answer overdue by more than stall_timeout_s closes its connection as Stalled.
void Runner::check_stalls(int64_t now) {
    const auto limit = static_cast<int64_t>(cfg_.stall_timeout_s * 1e9);
    for (Conn& c : conns_) {
        if (c.state != State::Open || c.sent == c.recvd) continue;
        const size_t slot = c.local * pipeline_ + c.recvd % pipeline_;
        if (now - slot_sent_[slot] > limit) {
            char limit_s[32];
            std::snprintf(limit_s, sizeof(limit_s), "%g", cfg_.stall_timeout_s);
            fail(c, LoadError::Stalled,
                 "message " + std::to_string(c.recvd) + " unanswered for more than " + limit_s +
                     " s");
        }
    }
}

void Runner::fail(Conn& c, LoadError kind, const std::string& detail) {
    count_error(kind, "connection " + std::to_string(c.gid) + ": " + detail);
    close_conn(c);
}

void Runner::count_error(LoadError kind, const std::string& detail) {
    ++out_.errors[static_cast<size_t>(kind)];
    counters_.errors.store(++errors_, std::memory_order_relaxed);
    if (out_.first_error.empty()) {
        out_.first_error = std::string(load_error_name(kind)) + ": " + detail;
    }
}

void Runner::close_conn(Conn& c) {
    if (c.state == State::Connecting) --connecting_;
    if (c.state == State::Open) {
        --open_;
        if (priming_ && c.recvd == 0) --waiting_prime_;
        counters_.open.store(open_, std::memory_order_relaxed);
    }
    net::close_socket(c.fd);  // the only descriptor: this also leaves the epoll set
    c.fd = kInvalidSocket;
    c.state = State::Closed;
}

}  // namespace

void run_runner(SharedRun& run, const std::vector<uint32_t>& ids, RunnerCounters& counters,
                RunnerResult& out) noexcept {
    try {
        Runner r(run, ids, counters, out);
        r.run();
    } catch (const SystemError& e) {
        out.fatal = e.what();
        out.fatal_errno = e.code();
        run.abort.store(true, std::memory_order_relaxed);
    } catch (const std::exception& e) {
        out.fatal = e.what();
        run.abort.store(true, std::memory_order_relaxed);
    } catch (...) {
        out.fatal = "unknown error in a load thread";
        run.abort.store(true, std::memory_order_relaxed);
    }
    counters.ready.store(true, std::memory_order_release);
    counters.finished.store(true, std::memory_order_release);
}

}  // namespace loadgen
}  // namespace iocpnative
