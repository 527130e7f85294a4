#include "worker.hpp"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "iocpnative/errors.hpp"
#include "net.hpp"
#include "server_core.hpp"

namespace iocpnative {

namespace {
constexpr int kMaxEvents = 128;
}  // namespace

int64_t monotonic_ms() noexcept {
    using namespace std::chrono;
    return duration_cast<milliseconds>(steady_clock::now().time_since_epoch()).count();
}

Worker::Worker(ServerCore& core, int index, std::unique_ptr<Poller> poller, IoDataPool& pool,
               ConnectionTable& table, WorkerStats& stats)
    : core_(core),
      index_(index),
      poller_(std::move(poller)),
      pool_(pool),
      table_(table),
      stats_(stats) {
    const double idle = core_.config().idle_timeout;
    // 0 means never; a tiny timeout still means 1 ms, a huge one (kNeverSeconds) means never.
    if (idle > 0 && idle < kNeverSeconds) {
        idle_ms_ = std::max<int64_t>(1, static_cast<int64_t>(idle * 1000.0 + 0.5));
    }
}

Worker::~Worker() = default;

void Worker::run() noexcept {
    try {
        loop();
    } catch (const std::exception& e) {
        std::fprintf(stderr, "iocpnative: worker %d stopped: %s\n", index_, e.what());
        // Leave nothing behind: close what this worker owns and drain what it can.
        try {
            if (!draining_) begin_drain();
            Event events[kMaxEvents];
            for (int spins = 0; spins < 1000 && !(table_.empty() && poller_->quiescent());
                 ++spins) {
                const int n = poller_->wait(events, kMaxEvents, 10);
                for (int i = 0; i < n; ++i) dispatch(events[i]);
            }
        } catch (...) {
        }
    }
    core_.worker_finished();
}

int Worker::wait_timeout_ms() const {
    if (draining_) return 10;  // re-check the drain condition; stop() woke us once already
    if (idle_ms_ == 0) return -1;
    const int64_t left = next_idle_scan_ms_ - monotonic_ms();
    // Long idle timeouts scan rarely; a wait is capped so that the ms count fits in an int.
    return left <= 0 ? 0 : static_cast<int>(std::min<int64_t>(left, int64_t{1} << 30));
}

void Worker::loop() {
    Event events[kMaxEvents];
    now_ms_ = monotonic_ms();
    next_idle_scan_ms_ = now_ms_ + (idle_ms_ > 0 ? std::max<int64_t>(idle_ms_ / 4, 1) : 0);
    for (;;) {
        if (!draining_ && core_.stop_requested()) begin_drain();
        if (draining_ && table_.empty() && poller_->quiescent()) return;
        const int n = poller_->wait(events, kMaxEvents, wait_timeout_ms());
        if (idle_ms_ > 0 || core_.config().verbose) now_ms_ = monotonic_ms();
        for (int i = 0; i < n; ++i) dispatch(events[i]);
        if (idle_ms_ > 0 && !draining_ && now_ms_ >= next_idle_scan_ms_) scan_idle();
    }
}

void Worker::dispatch(const Event& ev) {
    switch (ev.kind) {
        case Event::Kind::Accepted:
            on_accepted(ev.accepted);
            break;
        case Event::Kind::Recv:
            on_recv(*ev.conn, ev.io, ev.result);
            break;
        case Event::Kind::Send:
            on_send(*ev.conn, *ev.io, ev.result);
            break;
    }
}

void Worker::on_accepted(socket_t s) {
    auto& active = core_.active_connections();
    if (draining_ ||
        active.load(std::memory_order_relaxed) >=
            static_cast<int64_t>(core_.config().max_connections)) {
        // Accepted and closed at once: the peer sees EOF instead of waiting in a queue. Counted
        // first, so that a peer which has seen the EOF also sees the count.
        if (!draining_) WorkerStats::add(stats_.rejected_connections, 1);
        net::close_socket(s);
        return;
    }
    auto* c = new Connection();
    c->sock = s;
    c->id = core_.next_connection_id();
    c->owner = index_;
    c->last_active_ms = monotonic_ms();
    net::set_nodelay(s);
    const int err = poller_->attach(*c);
    if (err != 0) {
        WorkerStats::add(stats_.rejected_connections, 1);
        net::close_socket(s);
        delete c;
        return;
    }
    active.fetch_add(1, std::memory_order_relaxed);
    WorkerStats::add(stats_.total_connections, 1);
    table_.add(c);
    if (core_.config().verbose) log_connect(*c);
    if (DataHandler* h = core_.handler()) h->on_connect(c->id, net::peer_name(s));
    post_recv(*c);
}

void Worker::post_recv(Connection& c) {
    if (c.closing) return op_done_check(c);
    ++c.ops_in_flight;
    poller_->post_recv(c);
}

void Worker::post_send(Connection& c, IoData& io) {
    ++c.ops_in_flight;
    io.conn = &c;
    io.op = Op::Send;
    poller_->post_send(c, io);
}

void Worker::on_recv(Connection& c, IoData* io, int64_t result) {
    if (result <= 0 || c.closing || c.close_requested.load(std::memory_order_relaxed)) {
        pool_.release(io);
        if (!c.closing) close_connection(c);
        return op_done(c);
    }
    WorkerStats::add(stats_.bytes_received, result);
    c.last_active_ms = now_ms_;
    io->len = static_cast<uint32_t>(result);
    io->offset = 0;
    if (core_.handler() != nullptr && !reply_with_handler(c, *io)) {
        pool_.release(io);
        close_connection(c);
        return op_done(c);
    }
    --c.ops_in_flight;  // the recv is done; the send below (or the next recv) takes over
    if (io->len == 0) {
        pool_.release(io);  // the handler had nothing to say
        return post_recv(c);
    }
    post_send(c, *io);
}

void Worker::on_send(Connection& c, IoData& io, int64_t result) {
    // Counted even on a closing connection: a completion backend may report a send that the
    // kernel finished just before close() asked to cancel it, and those bytes did reach the peer.
    if (result > 0) WorkerStats::add(stats_.bytes_sent, result);
    if (result < 0 || c.closing || c.close_requested.load(std::memory_order_relaxed)) {
        pool_.release(&io);
        if (!c.closing) close_connection(c);
        return op_done(c);
    }
    io.offset += static_cast<uint32_t>(result);
    --c.ops_in_flight;
    if (io.unsent() > 0) return post_send(c, io);  // a short send: send the rest
    if (c.pending_out && fill_from_pending(c, io)) return post_send(c, io);
    pool_.release(&io);
    post_recv(c);
}

// Runs the handler on the received chunk in `io` and puts (the first part of) its reply back
// into `io`; what does not fit waits in c.pending_out. Returns false on a handler error.
bool Worker::reply_with_handler(Connection& c, IoData& io) {
    std::string out;
    if (!core_.handler()->on_data(c.id, io.data(), io.len, out)) {
        WorkerStats::add(stats_.handler_errors, 1);
        return false;
    }
    io.len = 0;
    io.offset = 0;
    if (out.empty()) return true;
    c.pending_out = std::make_unique<std::string>(std::move(out));
    fill_from_pending(c, io);
    return true;
}

bool Worker::fill_from_pending(Connection& c, IoData& io) {
    std::string& p = *c.pending_out;
    const size_t n = std::min<size_t>(p.size(), io.capacity);
    std::memcpy(io.data(), p.data(), n);
    p.erase(0, n);
    if (p.empty()) c.pending_out.reset();
    io.len = static_cast<uint32_t>(n);
    io.offset = 0;
    return n > 0;
}

void Worker::close_connection(Connection& c) {
    if (c.closing) return;
    c.closing = true;
    poller_->close(c);  // in-flight operations now complete with an error, each exactly once
}

void Worker::op_done(Connection& c) {
    if (c.ops_in_flight > 0) --c.ops_in_flight;
    op_done_check(c);
}

void Worker::op_done_check(Connection& c) {
    if (!c.closing || c.ops_in_flight != 0) return;
    if (core_.config().verbose) {
        std::fprintf(stderr, "iocpnative: connection %llu closed\n",
                     static_cast<unsigned long long>(c.id));
    }
    if (DataHandler* h = core_.handler()) h->on_disconnect(c.id);
    table_.remove(&c);
    core_.active_connections().fetch_sub(1, std::memory_order_relaxed);
    delete &c;
}

void Worker::begin_drain() {
    draining_ = true;
    poller_->stop_accepting();
    // Close every connection this worker owns. Closing never frees: each connection goes away
    // when the completions of its cancelled operations have been handled.
    std::vector<Connection*> all;
    all.reserve(table_.size());
    table_.for_each([&](Connection* c) { all.push_back(c); });
    for (Connection* c : all) {
        close_connection(*c);
        op_done_check(*c);
    }
}

void Worker::scan_idle() {
    next_idle_scan_ms_ = now_ms_ + std::max<int64_t>(idle_ms_ / 4, 1);
    std::vector<Connection*> idle;
    table_.for_each([&](Connection* c) {
        if (!c->closing && now_ms_ - c->last_active_ms >= idle_ms_) idle.push_back(c);
    });
    for (Connection* c : idle) {
        if (core_.config().verbose) {
            std::fprintf(stderr, "iocpnative: connection %llu idle, closing\n",
                         static_cast<unsigned long long>(c->id));
        }
        close_connection(*c);
        op_done_check(*c);
    }
}

void Worker::log_connect(const Connection& c) const {
    std::fprintf(stderr, "iocpnative: connection %llu from %s (active %lld)\n",
                 static_cast<unsigned long long>(c.id), net::peer_name(c.sock).c_str(),
                 static_cast<long long>(core_.active_connections().load()));
}

}  // namespace iocpnative
