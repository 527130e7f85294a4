#include "worker.hpp"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <new>
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
      stats_(stats),
      handler_(core.handler()) {
    const double idle = core_.config().idle_timeout;
    // 0 means never; a tiny timeout still means 1 ms, a huge one (kNeverSeconds) means never.
    if (idle > 0 && idle < kNeverSeconds) {
        idle_ms_ = std::max<int64_t>(1, static_cast<int64_t>(idle * 1000.0 + 0.5));
    }
    buffer_scan_ms_ = std::max(0, poller_->buffer_scan_ms());
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
                handle_events(events, poller_->wait(events, kMaxEvents, 10));
            }
        } catch (...) {
        }
    }
    core_.worker_finished();
}

int Worker::wait_timeout_ms() const {
    if (draining_) return 10;  // re-check the drain condition; stop() woke us once already
    const bool buffers = scans_buffers();
    if (idle_ms_ == 0 && !buffers) return -1;
    int64_t due = idle_ms_ > 0 ? next_idle_scan_ms_ : next_buffer_scan_ms_;
    if (buffers) due = std::min(due, next_buffer_scan_ms_);
    const int64_t left = due - monotonic_ms();
    // Long idle timeouts scan rarely; a wait is capped so that the ms count fits in an int.
    return left <= 0 ? 0 : static_cast<int>(std::min<int64_t>(left, int64_t{1} << 30));
}

void Worker::loop() {
    Event events[kMaxEvents];
    now_ms_ = monotonic_ms();
    next_idle_scan_ms_ = now_ms_ + (idle_ms_ > 0 ? std::max<int64_t>(idle_ms_ / 4, 1) : 0);
    next_buffer_scan_ms_ = now_ms_ + buffer_scan_ms_;
    const bool clock = idle_ms_ > 0 || scans_buffers() || core_.config().verbose;
    for (;;) {
        if (!draining_ && core_.stop_requested()) begin_drain();
        if (draining_ && table_.empty() && poller_->quiescent()) return;
        const int n = poller_->wait(events, kMaxEvents, wait_timeout_ms());
        if (clock) now_ms_ = monotonic_ms();
        handle_events(events, n);
        if (idle_ms_ > 0 && !draining_ && now_ms_ >= next_idle_scan_ms_) scan_idle();
        if (scans_buffers() && !draining_ && now_ms_ >= next_buffer_scan_ms_) scan_buffers();
    }
}

void Worker::handle_events(const Event* events, int n) {
    // The echo path pays one branch per batch for the handler mode, nothing per event.
    if (handler_ != nullptr) return handle_events_with_handler(events, n);
    for (int i = 0; i < n; ++i) dispatch(events[i]);
}

// Handler mode: every other event is handled in order; the Recv completions that carry data are
// staged and handed to the handler in one on_batch call (one GIL acquisition for a Python
// handler), then each reply is posted. Reordering is safe: a connection has at most one
// operation in flight, so it has at most one event in a batch.
void Worker::handle_events_with_handler(const Event* events, int n) {
    staged_.clear();
    for (int i = 0; i < n; ++i) {
        const Event& ev = events[i];
        if (ev.kind == Event::Kind::Recv && recv_usable(*ev.conn, ev.result)) {
            stage_chunk(*ev.conn, *ev.io, ev.result);
        } else {
            dispatch(ev);
        }
    }
    const size_t k = staged_.size();
    if (k == 0) return;
    // A C++ handler may throw (std::bad_alloc, its own errors). Escaping, the exception stopped
    // this worker and left every staged chunk's IoData and connection in use for good. Now the
    // chunk it was handling counts as a handler error (its connection closes) and the rest of
    // the batch goes to the handler again.
    for (size_t from = 0; from < k;) {
        try {
            handler_->on_batch(chunks_.data() + from, k - from, core_.stop_flag());
            break;
        } catch (const std::exception& e) {
            from = fail_first_unhandled(from, k, e.what());
        } catch (...) {
            from = fail_first_unhandled(from, k, "unknown exception");
        }
    }
    for (size_t i = 0; i < k; ++i) finish_chunk(chunks_[i], *staged_[i].conn, *staged_[i].io);
}

void Worker::log_handler_exception(uint64_t conn_id, const char* what) {
    std::fprintf(stderr, "iocpnative: handler raised on connection %llu: %s\n",
                 static_cast<unsigned long long>(conn_id), what);
}

// The handler threw while on chunks [from, k): the first chunk it had not finished is the one it
// threw on. Returns where to go on.
size_t Worker::fail_first_unhandled(size_t from, size_t k, const char* what) {
    while (from < k && chunks_[from].handled) ++from;
    if (from == k) return k;
    log_handler_exception(chunks_[from].conn_id, what);
    chunks_[from].ok = false;
    chunks_[from].handled = true;
    return from + 1;
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
        case Event::Kind::Released:
            ev.conn->backend_holds = false;
            op_done_check(*ev.conn);
            break;
    }
}

void Worker::on_accepted(socket_t s) {
    auto& active = core_.active_connections();
    // The slot is taken before the check (and given back on a rejection), so that workers
    // accepting at the same moment cannot together go past max_connections.
    if (draining_ || active.fetch_add(1, std::memory_order_relaxed) >=
                         static_cast<int64_t>(core_.config().max_connections)) {
        if (!draining_) active.fetch_sub(1, std::memory_order_relaxed);
        // Accepted and closed at once: the peer sees EOF instead of waiting in a queue. Counted
        // first, so that a peer which has seen the EOF also sees the count.
        if (!draining_) WorkerStats::add(stats_.rejected_connections, 1);
        net::close_socket(s);
        return;
    }
    Connection* c = new (std::nothrow) Connection();
    if (c == nullptr) {  // out of memory: rejected like a connection over max_connections
        std::fprintf(stderr, "iocpnative: no memory for a new connection: rejected\n");
        active.fetch_sub(1, std::memory_order_relaxed);
        WorkerStats::add(stats_.rejected_connections, 1);
        net::close_socket(s);
        return;
    }
    c->sock = s;
    c->id = core_.next_connection_id();
    c->owner = index_;
    c->last_active_ms.store(monotonic_ms(), std::memory_order_relaxed);
    net::set_nodelay(s);
    const int err = poller_->attach(*c);
    if (err != 0) {
        active.fetch_sub(1, std::memory_order_relaxed);
        WorkerStats::add(stats_.rejected_connections, 1);
        net::close_socket(s);
        delete c;
        return;
    }
    WorkerStats::add(stats_.total_connections, 1);
    table_.add(c);
    if (core_.config().verbose) log_connect(*c);
    if (handler_ != nullptr &&
        !handler_says(c->id, [&] { return handler_->on_connect(c->id, net::peer_name(s)); })) {
        WorkerStats::add(stats_.handler_errors, 1);
        close_connection(*c);
        return op_done_check(*c);
    }
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

bool Worker::recv_usable(const Connection& c, int64_t result) const {
    return result > 0 && !c.closing && !c.close_requested.load(std::memory_order_relaxed);
}

void Worker::on_recv(Connection& c, IoData* io, int64_t result) {
    if (!recv_usable(c, result)) return on_recv_failed(c, io);
    WorkerStats::add(stats_.bytes_received, result);
    c.last_active_ms.store(now_ms_, std::memory_order_relaxed);
    io->len = static_cast<uint32_t>(result);
    io->offset = 0;
    --c.ops_in_flight;  // the recv is done; the send below takes over
    post_send(c, *io);
}

// EOF, an error, or a connection already closing: the buffer (if any) goes back and the
// connection closes.
void Worker::on_recv_failed(Connection& c, IoData* io) {
    pool_.release(io);
    if (!c.closing) close_connection(c);
    op_done(c);
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

void Worker::stage_chunk(Connection& c, IoData& io, int64_t result) {
    WorkerStats::add(stats_.bytes_received, result);
    c.last_active_ms.store(now_ms_, std::memory_order_relaxed);
    io.len = static_cast<uint32_t>(result);
    io.offset = 0;
    const size_t i = staged_.size();
    staged_.push_back(Staged{&c, &io});
    if (chunks_.size() <= i) chunks_.emplace_back();
    DataChunk& ch = chunks_[i];
    ch.conn_id = c.id;
    ch.data = io.data();
    ch.len = io.len;
    ch.out.clear();  // keeps its capacity: small replies need no allocation
    ch.handled = false;
    ch.ok = true;
}

// Posts the handler's reply to one chunk: what fits goes into the chunk's own IoData, the rest
// waits in c.pending_out and follows one IoData at a time, in order (on_send).
void Worker::finish_chunk(DataChunk& chunk, Connection& c, IoData& io) {
    if (!chunk.ok) WorkerStats::add(stats_.handler_errors, 1);
    if (!chunk.handled || !chunk.ok || c.close_requested.load(std::memory_order_relaxed)) {
        return on_recv_failed(c, &io);
    }
    --c.ops_in_flight;  // the recv is done; the send (or the next recv) takes over
    const size_t n = chunk.out.size();
    if (n == 0) {
        pool_.release(&io);  // the handler had nothing to say
        return post_recv(c);
    }
    if (n <= io.capacity) {
        std::memcpy(io.data(), chunk.out.data(), n);
        io.len = static_cast<uint32_t>(n);
        io.offset = 0;
    } else {
        c.pending_out = std::make_unique<std::string>(std::move(chunk.out));
        c.pending_off = 0;
        fill_from_pending(c, io);
    }
    post_send(c, io);
}

bool Worker::fill_from_pending(Connection& c, IoData& io) {
    const std::string& p = *c.pending_out;
    const size_t n = std::min<size_t>(p.size() - c.pending_off, io.capacity);
    std::memcpy(io.data(), p.data() + c.pending_off, n);
    c.pending_off += n;
    if (c.pending_off == p.size()) {
        c.pending_out.reset();
        c.pending_off = 0;
    }
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
    if (!c.closing || c.ops_in_flight != 0 || c.backend_holds) return;
    if (core_.config().verbose) {
        std::fprintf(stderr, "iocpnative: connection %llu closed\n",
                     static_cast<unsigned long long>(c.id));
    }
    if (handler_ != nullptr && !handler_says(c.id, [&] { return handler_->on_disconnect(c.id); })) {
        WorkerStats::add(stats_.handler_errors, 1);
    }
    table_.remove(&c);
    core_.active_connections().fetch_sub(1, std::memory_order_relaxed);
    delete &c;
}

void Worker::begin_drain() {
    draining_ = true;
    poller_->stop_accepting();
    if (table_.shared()) return request_close_shared(false);
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
    if (table_.shared()) {
        // One scan of the shared table is enough; worker 0 does it.
        if (index_ == 0) request_close_shared(true);
        return;
    }
    std::vector<Connection*> idle;
    table_.for_each([&](Connection* c) {
        if (!c->closing && is_idle(*c)) idle.push_back(c);
    });
    for (Connection* c : idle) {
        log_idle(*c);
        close_connection(*c);
        op_done_check(*c);
    }
}

// The backend's receive buffers held by waiting connections (Poller::buffer_scan_ms). The walk
// holds the table lock, but the backend does only a check and at most a cancellation each. A
// shared table's connections may be in any state (another worker may be closing one): the backend
// checks under its own lock.
void Worker::scan_buffers() {
    next_buffer_scan_ms_ = now_ms_ + buffer_scan_ms_;
    poller_->begin_buffer_scan();
    table_.for_each([&](Connection* c) { poller_->scan_buffers(*c); });
}

// Shared queue: another worker may be handling any of these connections right now, so this
// thread must neither close nor free them. It flags them and lets the backend cancel their
// operation in flight; the worker that receives the (cancelled) completion closes. The table
// lock, held during the walk, keeps each connection alive while it is flagged.
void Worker::request_close_shared(bool idle_only) {
    table_.for_each([&](Connection* c) {
        if (idle_only && !is_idle(*c)) return;
        if (c->close_requested.exchange(true)) return;  // already asked
        if (idle_only) log_idle(*c);
        poller_->request_close(*c);
    });
}

bool Worker::is_idle(const Connection& c) const {
    return now_ms_ - c.last_active_ms.load(std::memory_order_relaxed) >= idle_ms_;
}

void Worker::log_idle(const Connection& c) const {
    if (!core_.config().verbose) return;
    std::fprintf(stderr, "iocpnative: connection %llu idle, closing\n",
                 static_cast<unsigned long long>(c.id));
}

void Worker::log_connect(const Connection& c) const {
    std::fprintf(stderr, "iocpnative: connection %llu from %s (active %lld)\n",
                 static_cast<unsigned long long>(c.id), net::peer_name(c.sock).c_str(),
                 static_cast<long long>(core_.active_connections().load()));
}

}  // namespace iocpnative
