// The small interface every backend implements: turn one OS primitive into completions.
//
// The core (csrc/core/worker.cpp) owns the state machine; a backend only posts operations and
// reports their completions as Events. The contract, identical for IOCP, io_uring and epoll:
//
//  * Every post_recv / post_send yields exactly one Event of the same kind, later, from wait()
//    on a worker thread. Never inline: posting from inside event handling must not recurse.
//  * Recv: the backend takes an IoData from the worker's pool when it needs a buffer (at post
//    time, or only once data is there: epoll, provided buffers, zero-byte reads) and hands it
//    over in the Event with io->len = result. result == 0 is EOF; result < 0 is -errno, and then
//    io may be nullptr.
//  * Send: sends io->data()[io->offset, io->len); result is the number of bytes this operation
//    sent (a short send is normal: the core posts the rest) or -errno. io comes back in the Event.
//  * close(conn) closes the socket. Every operation still in flight for it then completes with a
//    negative result (-ECANCELED or the OS's error), each exactly once; a send the kernel had
//    already finished when close() came may report its real byte count instead (io_uring, IOCP).
//    The core frees the Connection after the last of those; the backend must not touch it
//    afterwards. A backend with a kernel operation of its own on the connection (io_uring's
//    multishot recv, which stays armed while the core's send runs) sets backend_holds in
//    close() and, once that operation has ended, reports a Released event (the core then clears
//    the flag) or, when the core's recv was waiting on it, clears the flag itself and reports
//    that recv's completion.
//  * Accepted events carry a new connected socket; the core decides to keep it (attach) or not.
//  * wake() may be called from any thread; it makes a blocked wait() return soon (one wake-up
//    per worker is enough: stop() sends exactly one to each).
//  * Shared queue (IOCP): a connection's completions may be handled on any worker, so only the
//    thread handling its current completion may close it. Other threads (stop, idle scans) set
//    Connection::close_requested and call request_close(), which cancels the operation in
//    flight; its completion then reaches a worker that sees the flag and closes.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "../core/connection.hpp"
#include "../core/io_data.hpp"
#include "../core/stats.hpp"
#include "iocpnative/platform.hpp"

namespace iocpnative {

struct Event {
    enum class Kind : uint8_t { Accepted, Recv, Send, Released };
    Kind kind = Kind::Recv;
    Connection* conn = nullptr;          // Recv, Send
    IoData* io = nullptr;                // Recv (may be nullptr on error), Send
    int64_t result = 0;                  // bytes, or -errno
    socket_t accepted = kInvalidSocket;  // Accepted

    // A Recv or Send completion.
    static Event completion(Kind kind, Connection& c, IoData* io, int64_t result) {
        Event e;
        e.kind = kind;
        e.conn = &c;
        e.io = io;
        e.result = result;
        return e;
    }

    // The backend let go of a closed connection it held (Connection::backend_holds); the core
    // clears the flag and frees the connection if nothing else is in flight.
    static Event released(Connection& c) {
        Event e;
        e.kind = Kind::Released;
        e.conn = &c;
        return e;
    }
};

// One per worker thread. All methods but wake() are called on that worker's thread only.
class Poller {
  public:
    virtual ~Poller() = default;
    // Blocks up to timeout_ms (-1 = no limit) for at least one event or a wake-up; fills at most
    // `max` events and returns how many (0 on timeout or wake-up). Throws SystemError only for a
    // failure that makes the worker unusable.
    virtual int wait(Event* out, int max, int timeout_ms) = 0;
    // Registers a freshly accepted socket. Returns 0, or an errno value (the core then closes it).
    virtual int attach(Connection& conn) = 0;
    virtual void post_recv(Connection& conn) = 0;
    virtual void post_send(Connection& conn, IoData& io) = 0;
    virtual void close(Connection& conn) = 0;
    // No more Accepted events from this worker after this call. The core calls it once per
    // worker, when that worker begins its drain (its waits are bounded from then on).
    virtual void stop_accepting() = 0;
    // True when the backend has nothing of its own in flight (accepts, cancellations), so the
    // worker may exit once its connections are gone.
    virtual bool quiescent() const = 0;
    // Any thread.
    virtual void wake() = 0;
    // Any thread; only called when the backend has a shared queue. conn.close_requested is
    // already set; cancel its operation in flight (and make a later post complete at once with
    // an error) so that the close happens soon on the thread handling it. The caller holds the
    // ConnectionTable lock, so conn stays alive during the call.
    virtual void request_close(Connection& conn) { (void)conn; }
    // Receive buffers held by waiting connections (IOCP: the buffer of a pending WSARecv). A
    // backend that needs it returns a period here; the worker that scans the connection table
    // (every worker its own; worker 0 a shared one) then calls scan_buffers(conn) for each
    // connection that often, on its own thread, holding the table lock (conn stays alive). The
    // backend takes back the buffers of reads that have waited since the previous scan. Each scan
    // starts with begin_buffer_scan(). Not called while draining.
    virtual int buffer_scan_ms() const { return 0; }
    virtual void begin_buffer_scan() {}
    virtual void scan_buffers(Connection& conn) { (void)conn; }
};

// Everything a Poller needs from its server.
struct PollerContext {
    int index = 0;                       // worker index
    int workers = 1;                     // worker count
    socket_t listener = kInvalidSocket;  // bound and listening, non-blocking
    IoDataPool* pool = nullptr;          // this worker's pool (the shared one for IOCP)
    // IoData without a buffer (capacity 0), for operations that carry no data: IOCP's AcceptEx
    // and zero-byte reads. Shared like `pool`; only backends with a shared queue get one.
    IoDataPool* header_pool = nullptr;
    unsigned batch_wait_us = 0;    // ServerConfig::batch_wait_us (0: no batched waits)
    WorkerStats* stats = nullptr;  // this worker's counters (the Poller may write its own)
};

class Backend {
  public:
    virtual ~Backend() = default;
    virtual const char* name() const = 0;
    // One completion queue for all workers (IOCP): the core then uses one shared, locked pool and
    // connection table, and a connection's events may be handled on any worker.
    virtual bool shared_queue() const { return false; }
    virtual std::unique_ptr<Poller> make_poller(const PollerContext& ctx) = 0;
};

// --- registry (backend/registry.cpp) ---------------------------------------------------------

struct BackendStatus {
    std::string name;
    bool compiled = false;   // built into this binary
    bool available = false;  // usable here and now (probed at run time)
    std::string reason;      // why not, when unavailable
};

// Every backend this platform knows, best first, with its run-time status.
std::vector<BackendStatus> backend_statuses();
// Names of the usable backends, best first.
std::vector<std::string> available_backends();
// Resolves "auto" (honouring IOCPNATIVE_BACKEND) or checks a named backend; throws
// std::invalid_argument naming the allowed values when it is unknown or unavailable here.
std::string resolve_backend(const std::string& requested);
std::unique_ptr<Backend> create_backend(const std::string& resolved_name);

}  // namespace iocpnative
