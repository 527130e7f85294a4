// Connection: one accepted socket and the state the echo state machine keeps for it.
//
// Invariant of the state machine (the seed's read -> write -> read rhythm): at most one Recv or
// Send is in flight per connection, so a connection's events are handled by one thread at a
// time even when completions may arrive on any worker (IOCP). That rhythm is also the
// backpressure: while a write waits for a slow reader, nothing more is read from that peer
// (io_uring's multishot recv, armed across the write, reads ahead at most about one buffer before
// the backend cancels it).
//
// A Connection is freed only when it is closing, `ops_in_flight` is 0 and the backend does not
// hold it, i.e. after the completion of every operation posted for it has been handled (the
// cancellation ones included).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>

#include "iocpnative/platform.hpp"

namespace iocpnative {

struct IoData;

struct Connection {
    socket_t sock = kInvalidSocket;
    uint64_t id = 0;
    int owner = 0;               // index of the ConnectionTable that lists it
    uint32_t ops_in_flight = 0;  // posted, completion not yet handled
    bool closing = false;        // close() has been called; no new operation may be posted
    // Set from another thread (stop, idle scan) to ask the thread handling the connection's
    // events to close it (IOCP: completions of one connection may run on any worker).
    std::atomic<bool> close_requested{false};
    // Written by the thread handling the connection, read by the idle scan on another worker.
    std::atomic<int64_t> last_active_ms{0};
    // Backend-private per-connection state (epoll: readiness and the waiting operation; io_uring:
    // also data and an end received by a multishot recv before the core asked for it).
    uint32_t backend_flags = 0;
    IoData* backend_io = nullptr;
    IoData* backend_stash = nullptr;
    int32_t backend_end = 0;
    // Set by a backend whose kernel operation of its own (io_uring's multishot recv) still
    // refers to the connection after close(): the core frees it only once the flag is clear
    // again (see Event::Kind::Released in backend.hpp).
    bool backend_holds = false;
    // A handler's reply larger than one IoData: sent from pending_off on, one IoData at a time
    // (an offset rather than erasing the sent prefix, which would be quadratic in the size).
    std::unique_ptr<std::string> pending_out;
    size_t pending_off = 0;
    // Intrusive list of the owning table.
    Connection* prev = nullptr;
    Connection* next = nullptr;
};

// The connections one worker owns (or, for a backend with one shared completion queue, all of
// them, with `shared` set so that add/remove/visit take a lock). Used on accept, on close and by
// stop()/idle scans; never per message.
class ConnectionTable {
  public:
    explicit ConnectionTable(bool shared) : shared_(shared) {}
    void add(Connection* c);
    void remove(Connection* c);
    size_t size() const { return size_.load(std::memory_order_relaxed); }
    bool empty() const { return size() == 0; }
    bool shared() const { return shared_; }
    // Calls fn(Connection*) for each connection; fn must not add or remove. A shared table holds
    // its lock during the walk, so no connection listed can be removed (and freed) meanwhile.
    template <class Fn>
    void for_each(Fn&& fn) {
        std::unique_lock<std::mutex> guard(lock_, std::defer_lock);
        if (shared_) guard.lock();
        for (Connection* c = head_; c != nullptr; c = c->next) fn(c);
    }

  private:
    const bool shared_;
    std::mutex lock_;
    Connection* head_ = nullptr;
    std::atomic<size_t> size_{0};
};

}  // namespace iocpnative
