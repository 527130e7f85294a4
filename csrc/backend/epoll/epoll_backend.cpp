// epoll backend: readiness emulated into completions. Linux >= 2.6.27 (epoll_create1, accept4,
// eventfd); EPOLLEXCLUSIVE (Linux >= 4.5) is used for the shared listener when the kernel has it.
//
// The kernel only says "ready"; this backend then performs the recv/send itself and queues the
// result as a completion, so the core sees the same Events as from IOCP or io_uring (asio's
// reactor and libuv's unix loop work this way).
//
// Per-connection state lives in Connection::backend_flags:
//   kReadable / kWritable  readiness learnt from edge-triggered events. A short read or write, or
//                          EAGAIN, clears it; the next edge sets it again. With EPOLLET a new
//                          edge is raised for every new arrival of data or buffer space, so no
//                          wake-up is lost by assuming "short = drained".
//   kPeerDone              EPOLLRDHUP/EPOLLHUP/EPOLLERR was seen: the end of the stream (or an
//                          error) is queued behind the data, and no further edge will announce
//                          it, so a short read must not clear kReadable (the next recv returns
//                          the 0 or the error). Without this a connection that sends nothing
//                          back (a handler returning None) would never see the peer's FIN.
//   kWantRecv / kWantSend  an operation is posted and its completion not yet queued. close()
//                          turns exactly these into -ECANCELED completions, so every posted
//                          operation completes exactly once.
//   kPeerDone              the peer has shut down its side (EPOLLRDHUP/HUP/ERR). That edge comes
//                          once: if it came with the last data, a short read does not mean
//                          "drained", since the EOF (or error) is still to be read and no new
//                          edge will announce it. So the socket stays readable from then on.
// The sockets are registered once, at attach, for EPOLLIN|EPOLLOUT|EPOLLRDHUP|EPOLLET: no
// epoll_ctl per operation.
//
// Batch waits (ServerConfig::batch_wait_us, the same BatchPolicy as io_uring's; wait_policy.hpp):
// at a moderate message rate each message otherwise costs a wake-up of this worker, paid by the
// client's CPU (an inter-processor interrupt), and a wake-up of the client when the reply is
// sent, paid by ours. epoll_wait cannot wait for "n events or a window", since the first event
// ends it. So a worker that would block, with kBatchMinConns or more connections and the policy
// on, sleeps instead in ppoll on the wake-up eventfd alone: arriving data wakes nobody (no
// waiter on the epoll set), wake() still does. It then takes what came with epoll_wait(0), and
// goes on until one request per kConnsPerBatched connections (at most kBatchCount) has arrived
// or the window is over; each sleep lasts as long as the last span's arrival rate needs to bring
// the rest (so a busy worker sleeps tens of microseconds, not the window). A window that brought
// nothing ends in a plain blocking epoll_wait. What is ready when the worker comes to wait is
// answered at once. Near saturation (fills_fast()) there are no batch waits: saturated on 50 x
// 512 B they ran at 0.96x the C epoll peer's msgs/s against 1.01x before (5 rounds; the client
// 93 % busy, waiting for held replies); without them 1.01x. Measured with peers.py (3 rounds,
// quiet machine), server CPU per message against before (and c_epoll): 30,000/s on 50 x 512 B
// 6.91 vs 14.03 us (14.94), p50 276 vs 109 us; 20,000/s on 1000 x 128 B 8.44 vs 14.46 (14.06);
// 100,000/s on 50 x 512 B 4.00 vs 5.43 (5.34); 10,000/s on 20 x 512 B 15.12 vs 30.34 (28.37);
// saturated 1000 x 128 B 1.05x vs 1.04x c_epoll's msgs/s. The price, as on io_uring, where the
// rate only sometimes fills a window: 5,000/s on 100 x 512 B 32.49 vs 32.01 us (31.07). Those
// had a 200 us window; with the 500 us default (the AMD VM, 5 rounds, against 200 us and c_epoll):
// 30,000/s 12.52 vs 13.23 us (16.22), p50 381 vs 266 us, p99 6,390 vs 1,393 us (8,290);
// 20,000/s on 1000 x 128 B 14.09 vs 16.73 us (19.53), p99 3,129 vs 2,392 us (4,784).
#include <errno.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>

#include "../../core/net.hpp"
#include "../../core/worker.hpp"
#include "../factories.hpp"
#include "../wait_policy.hpp"
#include "iocpnative/errors.hpp"

namespace iocpnative {

namespace {

constexpr uint32_t kReadable = 1u << 0;
constexpr uint32_t kWritable = 1u << 1;
constexpr uint32_t kWantRecv = 1u << 2;
constexpr uint32_t kWantSend = 1u << 3;
constexpr uint32_t kPeerDone = 1u << 4;

constexpr int kEpollBatch = 128;
constexpr int kAcceptBurst = 64;         // accepts per readiness event, for fairness
constexpr int kReadyOnlyRounds = 4;      // rounds served from the queue before polling again
constexpr int64_t kAcceptPauseMs = 100;  // back-off after EMFILE/ENFILE/ENOBUFS/ENOMEM
constexpr int64_t kBatchMinConns = 16;   // batch waits need this many connections
constexpr int64_t kConnsPerBatched = 4;  // a batch is one request per 4 connections,
constexpr int64_t kBatchCount = 16;      // at most 16 (or what the window brings)
constexpr int64_t kMinSliceUs = 10;      // shortest sleep of a batch wait
constexpr int64_t kFastFill = 2;         // no batch waits when a window brings 2 batches

class EpollPoller final : public Poller {
  public:
    explicit EpollPoller(const PollerContext& ctx)
        : pool_(*ctx.pool), listener_(ctx.listener), batch_wait_us_(ctx.batch_wait_us) {
        ep_ = ::epoll_create1(EPOLL_CLOEXEC);
        if (ep_ < 0) throw make_system_error(errno, "epoll_create1");
        wake_fd_ = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        if (wake_fd_ < 0) {
            const int err = errno;
            ::close(ep_);
            throw make_system_error(err, "eventfd");
        }
        epoll_event ev{};
        ev.events = EPOLLIN;
        ev.data.ptr = &wake_tag_;
        if (::epoll_ctl(ep_, EPOLL_CTL_ADD, wake_fd_, &ev) != 0) {
            const int err = errno;
            close_fds();
            throw make_system_error(err, "epoll_ctl(eventfd)");
        }
        const int err = register_listener();
        if (err != 0) {
            close_fds();
            throw make_system_error(err, "epoll_ctl(listener)");
        }
    }

    ~EpollPoller() override {
        // After a clean drain the queue is empty; if a worker died, give back what it held.
        for (size_t i = head_; i < ready_.size(); ++i) {
            Event& e = ready_[i];
            if (e.kind == Event::Kind::Accepted)
                net::close_socket(e.accepted);
            else
                pool_.release(e.io);
        }
        close_fds();
    }

    int wait(Event* out, int max, int timeout_ms) override {
        if (head_ < ready_.size()) {
            if (ready_only_rounds_ < kReadyOnlyRounds) {
                ++ready_only_rounds_;
                return take(out, max);
            }
            timeout_ms = 0;
        }
        ready_only_rounds_ = 0;
        timeout_ms = clamp_for_accept_pause(timeout_ms);
        if (timeout_ms != 0 && batch_wait_us_ > 0) {
            end_span_if_due();
            if (batch_policy_.on() && conns_ >= kBatchMinConns && !fills_fast()) {
                // What is ready now is answered now; only a worker that would sleep waits for
                // a batch.
                poll_ready(0);
                if (head_ == ready_.size()) {
                    const int64_t before = batch_policy_.arrivals();
                    const bool woken = gather_batch();
                    batch_policy_.batch_wait(batch_policy_.arrivals() - before);
                    // Nothing came in the window: wait for the first event, as without batching.
                    // After wake() the core must see control again (stop(), a close request).
                    if (!woken && head_ == ready_.size()) poll_ready(timeout_ms);
                }
                resume_accept_if_due();
                return take(out, max);
            }
        }
        poll_ready(timeout_ms);
        resume_accept_if_due();
        return take(out, max);
    }

    int attach(Connection& c) override {
        if (net::set_nonblocking(c.sock, true) != 0) return errno;
        c.backend_flags = kWritable;
        c.backend_io = nullptr;
        epoll_event ev{};
        ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
        ev.data.ptr = &c;
        if (::epoll_ctl(ep_, EPOLL_CTL_ADD, c.sock, &ev) != 0) return errno;
        ++conns_;
        return 0;
    }

    void post_recv(Connection& c) override {
        c.backend_flags |= kWantRecv;
        if (c.backend_flags & kReadable) do_recv(c);
    }

    void post_send(Connection& c, IoData& io) override {
        c.backend_io = &io;
        c.backend_flags |= kWantSend;
        if (c.backend_flags & kWritable) do_send(c);
    }

    void close(Connection& c) override {
        if (c.backend_flags & kWantRecv) push(Event::Kind::Recv, c, nullptr, -ECANCELED);
        if (c.backend_flags & kWantSend) push(Event::Kind::Send, c, c.backend_io, -ECANCELED);
        c.backend_flags = 0;
        c.backend_io = nullptr;
        // Closing the descriptor removes it from the epoll set only if it was the socket's last
        // one: after a fork() (os.fork, multiprocessing, the fork before an exec) the child holds
        // the socket too, and later data on it would reach us with the freed Connection.
        ::epoll_ctl(ep_, EPOLL_CTL_DEL, c.sock, nullptr);
        net::close_socket(c.sock);
        --conns_;
        c.sock = kInvalidSocket;
    }

    void stop_accepting() override {
        accepting_ = false;
        if (listener_registered_) {
            ::epoll_ctl(ep_, EPOLL_CTL_DEL, listener_, nullptr);
            listener_registered_ = false;
        }
    }

    bool quiescent() const override { return head_ == ready_.size(); }

    void wake() override {
        const uint64_t one = 1;
        // EAGAIN means the counter is already non-zero: a wake-up is pending anyway.
        (void)!::write(wake_fd_, &one, sizeof(one));
    }

  private:
    void poll_ready(int timeout_ms) {
        epoll_event evs[kEpollBatch];
        const int n = ::epoll_wait(ep_, evs, kEpollBatch, timeout_ms);
        if (n < 0 && errno != EINTR) throw make_system_error(errno, "epoll_wait");
        for (int i = 0; i < n; ++i) on_ready(evs[i]);
    }

    // One request per kConnsPerBatched connections, at most kBatchCount.
    int64_t batch_target() const noexcept {
        return std::min(kBatchCount, conns_ / kConnsPerBatched);
    }

    // At the last span's arrival rate a window would bring kFastFill batches or more: the worker
    // is near saturation, where the next request is microseconds away and a batch wait, which
    // cannot be ended by the request that completes the batch, holds requests the client is
    // waiting for. A plain wait does better there.
    bool fills_fast() const noexcept {
        return rate_per_ms_ * batch_wait_us_ >= kFastFill * batch_target() * 1000;
    }

    // A batch wait: sleeps (woken only by wake(), not by arriving data, so the peers' CPUs pay
    // no wake-up) and collects what arrived, until a batch came or the window is over. Each
    // sleep lasts as long as the last span's arrival rate needs to bring the rest of the batch.
    // Returns true when wake() ended it.
    bool gather_batch() {
        const int64_t start = monotonic_us();
        const int64_t deadline = start + batch_wait_us_;
        const int64_t target = batch_target();
        const int64_t first = batch_policy_.arrivals();
        for (int64_t now = start; now < deadline; now = monotonic_us()) {
            const int64_t missing = target - (batch_policy_.arrivals() - first);
            if (missing <= 0) break;
            int64_t slice = deadline - now;
            if (rate_per_ms_ > 0) slice = std::min(slice, missing * 1000 / rate_per_ms_);
            slice = std::max(slice, kMinSliceUs);
            pollfd p{};
            p.fd = wake_fd_;
            p.events = POLLIN;
            timespec ts{};
            ts.tv_sec = static_cast<time_t>(slice / 1000000);
            ts.tv_nsec = static_cast<long>(slice % 1000000) * 1000;
            const int woken = ::ppoll(&p, 1, &ts, nullptr);
            poll_ready(0);
            if (woken > 0) return true;  // wake(): the core has work for us
        }
        return false;
    }

    void end_span_if_due() {
        const int64_t now = monotonic_us();
        const int64_t span = now - span_since_;
        if (span < waits::kSpanUs) return;
        rate_per_ms_ = batch_policy_.arrivals() * 1000 / span;
        batch_policy_.end_span(span, static_cast<int64_t>(batch_wait_us_));
        span_since_ = now;
    }

    static int64_t monotonic_us() noexcept {
        using namespace std::chrono;
        return duration_cast<microseconds>(steady_clock::now().time_since_epoch()).count();
    }

    void close_fds() {
        if (wake_fd_ >= 0) ::close(wake_fd_);
        if (ep_ >= 0) ::close(ep_);
        wake_fd_ = ep_ = -1;
    }

    int register_listener() {
        epoll_event ev{};
        ev.events = EPOLLIN | EPOLLEXCLUSIVE;  // wake one worker per new connection, not all
        ev.data.ptr = &listen_tag_;
        if (::epoll_ctl(ep_, EPOLL_CTL_ADD, listener_, &ev) != 0) {
            if (errno != EINVAL) return errno;
            ev.events = EPOLLIN;  // kernel < 4.5: no EPOLLEXCLUSIVE
            if (::epoll_ctl(ep_, EPOLL_CTL_ADD, listener_, &ev) != 0) return errno;
        }
        listener_registered_ = true;
        return 0;
    }

    void on_ready(const epoll_event& ev) {
        if (ev.data.ptr == &wake_tag_) {
            uint64_t v;
            (void)!::read(wake_fd_, &v, sizeof(v));
            return;
        }
        if (ev.data.ptr == &listen_tag_) return accept_ready();
        auto& c = *static_cast<Connection*>(ev.data.ptr);
        if (ev.events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) c.backend_flags |= kReadable;
        if (ev.events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) c.backend_flags |= kPeerDone;
        if (ev.events & (EPOLLOUT | EPOLLHUP | EPOLLERR)) c.backend_flags |= kWritable;
        if ((c.backend_flags & (kWantRecv | kReadable)) == (kWantRecv | kReadable)) do_recv(c);
        if ((c.backend_flags & (kWantSend | kWritable)) == (kWantSend | kWritable)) do_send(c);
    }

    void do_recv(Connection& c) {
        IoData* io = pool_.acquire();
        if (io == nullptr) {
            c.backend_flags &= ~kWantRecv;
            return push(Event::Kind::Recv, c, nullptr, -ENOMEM);
        }
        const ssize_t n = ::recv(c.sock, io->data(), io->capacity, 0);
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
            // Not readable after all: keep waiting for the next edge, holding no buffer.
            c.backend_flags &= ~kReadable;
            pool_.release(io);
            return;
        }
        c.backend_flags &= ~kWantRecv;
        if (n < 0) {
            const int err = errno;
            pool_.release(io);
            return push(Event::Kind::Recv, c, nullptr, -err);
        }
        if (static_cast<size_t>(n) < io->capacity && !(c.backend_flags & kPeerDone)) {
            c.backend_flags &= ~kReadable;
        }
        io->conn = &c;
        io->op = Op::Recv;
        if (n > 0) batch_policy_.arrival();
        push(Event::Kind::Recv, c, io, n);
    }

    void do_send(Connection& c) {
        IoData& io = *c.backend_io;
        const size_t want = io.unsent();
        const ssize_t n = ::send(c.sock, io.data() + io.offset, want, MSG_NOSIGNAL);
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
            c.backend_flags &= ~kWritable;  // wait for EPOLLOUT
            return;
        }
        c.backend_flags &= ~kWantSend;
        c.backend_io = nullptr;
        if (n >= 0 && static_cast<size_t>(n) < want) c.backend_flags &= ~kWritable;
        push(Event::Kind::Send, c, &io, n < 0 ? -errno : n);
    }

    void accept_ready() {
        for (int i = 0; i < kAcceptBurst && accepting_; ++i) {
            const int s = ::accept4(listener_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
            if (s >= 0) {
                Event e;
                e.kind = Event::Kind::Accepted;
                e.accepted = s;
                ready_.push_back(e);
                continue;
            }
            const int err = errno;
            if (err == EAGAIN || err == EWOULDBLOCK) return;
            if (err == EINTR || err == ECONNABORTED || err == EPROTO || err == EPERM) continue;
            if (err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM) {
                // Out of descriptors or memory: the listener would stay readable and spin, so
                // step back and retry later; pending connections wait in the backlog meanwhile.
                std::fprintf(stderr, "iocpnative: accept paused for %lld ms: %s\n",
                             static_cast<long long>(kAcceptPauseMs),
                             make_system_error(err, "accept").what());
                stop_accepting();
                accepting_ = true;
                accept_resume_ms_ = monotonic_ms() + kAcceptPauseMs;
                return;
            }
            std::fprintf(stderr, "iocpnative: %s\n", make_system_error(err, "accept").what());
            return;
        }
    }

    int clamp_for_accept_pause(int timeout_ms) const {
        if (accept_resume_ms_ == 0) return timeout_ms;
        const int64_t left = accept_resume_ms_ - monotonic_ms();
        const int wait = left <= 0 ? 0 : static_cast<int>(left);
        return (timeout_ms < 0 || wait < timeout_ms) ? wait : timeout_ms;
    }

    void resume_accept_if_due() {
        if (accept_resume_ms_ == 0 || monotonic_ms() < accept_resume_ms_) return;
        accept_resume_ms_ = 0;
        if (accepting_ && !listener_registered_) register_listener();
    }

    void push(Event::Kind kind, Connection& c, IoData* io, int64_t result) {
        ready_.push_back(Event::completion(kind, c, io, result));
    }

    int take(Event* out, int max) {
        int n = 0;
        while (n < max && head_ < ready_.size()) out[n++] = ready_[head_++];
        if (head_ == ready_.size()) {
            ready_.clear();
            head_ = 0;
        }
        return n;
    }

    IoDataPool& pool_;
    const int listener_;
    int ep_ = -1;
    int wake_fd_ = -1;
    bool accepting_ = true;
    bool listener_registered_ = false;
    int64_t accept_resume_ms_ = 0;
    int ready_only_rounds_ = 0;
    const unsigned batch_wait_us_;
    int64_t conns_ = 0;        // attached, not yet closed
    int64_t span_since_ = 0;   // start of the current wait-policy span
    int64_t rate_per_ms_ = 0;  // arrivals per millisecond in the last span
    waits::BatchPolicy batch_policy_;
    std::vector<Event> ready_;  // synthesised completions not yet returned by wait()
    size_t head_ = 0;
    char wake_tag_ = 0;
    char listen_tag_ = 0;
};

class EpollBackend final : public Backend {
  public:
    const char* name() const override { return "epoll"; }
    std::unique_ptr<Poller> make_poller(const PollerContext& ctx) override {
        return std::make_unique<EpollPoller>(ctx);
    }
};

}  // namespace

std::unique_ptr<Backend> make_epoll_backend() {
    return std::make_unique<EpollBackend>();
}

std::string probe_epoll() {
    const int fd = ::epoll_create1(EPOLL_CLOEXEC);
    if (fd < 0) return make_system_error(errno, "epoll_create1").what();
    ::close(fd);
    return "";
}

}  // namespace iocpnative
