// IOCP backend, per-worker part: GetQueuedCompletionStatusEx and the overlapped WSARecv/WSASend.
// Windows 7 SP1 or later (see iocp_backend.hpp); wine >= 7.
//
// Exactly one Event per posted operation (backend.hpp), in each of the cases Windows has
// (DESIGN.md; libuv's UV_SUCCEEDED_WITHOUT_IOCP and CPython's Modules/overlapped.c handle the
// same four):
//   pending (WSA_IO_PENDING)                 the port delivers one packet later
//   immediate success, skip mode on          no packet will come: queued locally here
//   immediate success, skip mode off         one packet comes anyway: nothing to do here
//   immediate failure                        no packet will come: queued locally here
// After issuing the call the IoData and the Connection belong to whichever worker dequeues the
// packet (it may run before WSARecv even returns here), so only locals are used afterwards.
//
// Receive buffers: a connection that waits long holds none. Its read is then a zero-byte WSARecv
// on a header-only IoData (PollerContext::header_pool), whose completion says "readable", and a
// non-blocking WSARecv reads the bytes (libuv does the same). A busy connection posts its reads
// with a buffer. Worker 0 scans the connections twice a second (Poller::scan_buffers) and cancels
// the reads with a buffer that have waited since its previous scan; their ERROR_OPERATION_ABORTED
// completions give the buffer back and post the zero-byte read. Either way the core sees exactly
// one Recv event per post_recv.
#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <type_traits>

#include "../../core/net.hpp"
#include "iocp_backend.hpp"
#include "iocp_stats.hpp"
#include "iocpnative/errors.hpp"

namespace iocpnative {
namespace iocp {

namespace {

// on_packet() turns the dequeued OVERLAPPED* back into its IoData with a cast.
static_assert(std::is_standard_layout<IoData>::value, "IoData must stay standard-layout");
static_assert(offsetof(IoData, overlapped) == 0, "the OVERLAPPED must be IoData's first member");

constexpr ULONG kBatch = 128;
// Connection::backend_flags, read and written under the connection's lock (after attach()).
constexpr uint32_t kSkipOnSuccess = 1u << 0;  // FILE_SKIP_COMPLETION_PORT_ON_SUCCESS is set
constexpr uint32_t kFirstRead = 1u << 1;    // no read posted yet: the first waits without a buffer
constexpr uint32_t kFullRead = 1u << 2;     // the last post was a read with a buffer
constexpr uint32_t kSeenWaiting = 1u << 3;  // a buffer scan found that read still posted
constexpr uint32_t kReclaiming = 1u << 4;   // a later scan cancelled it to take its buffer
constexpr uint32_t kReadFlags = kFirstRead | kFullRead | kSeenWaiting | kReclaiming;
// Zero-byte reads in a row that said "readable" with nothing to read (two bits; cleared by a read
// posted with a buffer and by a send, i.e. once the connection has had data).
constexpr int kEmptyShift = 5;
constexpr uint32_t kEmptyMask = 3u << kEmptyShift;

// Reads with a buffer that wait through two buffer scans (longer than this, at most twice it)
// give their buffer back and wait with a zero-byte read instead. IOCPNATIVE_IOCP_BUFFER_SCAN_MS
// overrides it (the tests shorten it; 0 keeps buffers posted however long a read waits).
constexpr int kBufferScanMs = 500;
// A zero-byte read that completes with nothing to read after all (inline or as a packet) is
// posted again; after this many in a row the read is posted with a buffer instead (it then simply
// waits). Windows and wine complete a zero-byte read only for data, the end or an error; a
// layered provider might not, and must not make a worker spin.
constexpr uint32_t kEmptyZeroReads = 3;
// At most this many reads cancelled per scan (CancelIoEx runs under the table lock, which
// accepts and closes on every worker wait for): thousands of connections falling silent at once
// give their buffers back over a few scans.
constexpr int kScanCancels = 1024;

// Zero-byte reads are told apart by their IoData's capacity 0: they must come from a pool of
// header-only blocks. The core gives one to every backend with a shared queue.
IoDataPool& header_pool_of(const PollerContext& ctx) {
    if (ctx.header_pool == nullptr || ctx.header_pool->buffer_size() != 0) {
        throw std::logic_error("the IOCP backend needs a header-only IoData pool");
    }
    return *ctx.header_pool;
}

int buffer_scan_ms_from_env() {
    const char* env = std::getenv("IOCPNATIVE_IOCP_BUFFER_SCAN_MS");
    if (env == nullptr || *env == '\0') return kBufferScanMs;
    char* end = nullptr;
    const long v = std::strtol(env, &end, 10);
    if (*end != '\0' || v < 0 || v > 3600 * 1000) return kBufferScanMs;
    return static_cast<int>(v);
}

class IocpPoller final : public Poller {
  public:
    IocpPoller(IocpBackend& backend, const PollerContext& ctx)
        : backend_(backend),
          pool_(*ctx.pool),
          headers_(header_pool_of(ctx)),
          index_(ctx.index),
          buffer_scan_ms_(buffer_scan_ms_from_env()),
          stats_(ctx.stats) {}

    ~IocpPoller() override {
        ready_.discard(pool_);
        add_completion_paths(paths_);
    }

    int wait(Event* out, int max, int timeout_ms) override {
        if (index_ == 0 && !accepts_started_) {
            // Posted from a worker thread, which lives until stop() has drained them.
            accepts_started_ = true;
            backend_.start_accepting();
        }
        // Locally queued completions are returned now, but the port is still polled so that
        // a connection completing inline again and again cannot starve the others.
        if (!ready_.empty()) timeout_ms = 0;
        // Parked accepts have no packet to wake anyone: every worker bounds its wait by their
        // due time, and the first awake posts them (the one that parked an accept always comes
        // back here, so one worker at least waits with the bound).
        timeout_ms = backend_.clamp_for_accept_pause(timeout_ms);
        const ULONG got =
            dequeue(static_cast<ULONG>(std::min<int>(max, static_cast<int>(kBatch))), timeout_ms);
        backend_.resume_accepts_if_due();
        if (held_wakes_ > 0) pass_on_held_wakes(got == 0);
        return ready_.take(out, max);
    }

    int attach(Connection& c) override {
        const HANDLE h = reinterpret_cast<HANDLE>(c.sock);
        if (::CreateIoCompletionPort(h, backend_.port(), kConnectionKey, 0) == nullptr) {
            return errno_from_native(static_cast<int>(::GetLastError()));
        }
        c.backend_flags = 0;
        // Without the mode the socket still works, every completion then comes as a packet.
        if (backend_.skip_on_success() &&
            ::SetFileCompletionNotificationModes(
                h, FILE_SKIP_COMPLETION_PORT_ON_SUCCESS | FILE_SKIP_SET_EVENT_ON_HANDLE)) {
            c.backend_flags = kSkipOnSuccess;
        }
        // Non-blocking, for the reads that follow a zero-byte read. Overlapped calls are not
        // affected: they still complete through the port.
        u_long nonblocking = 1;
        if (::ioctlsocket(c.sock, FIONBIO, &nonblocking) != 0) {
            return errno_from_native(::WSAGetLastError());
        }
        c.backend_flags |= kFirstRead;
        return 0;
    }

    // A connection waits for its first bytes, and for any after a long pause (scan_buffers), with
    // a zero-byte read, holding no buffer (libuv's zero reads); while it is busy, each read is
    // posted with a buffer, which saves the extra read call per message.
    void post_recv(Connection& c) override {
        std::lock_guard<std::mutex> g(backend_.lock_for(c));
        if (c.close_requested.load()) {
            ++paths_.failed_at_once;
            return push(Event::Kind::Recv, c, nullptr, -ECANCELED);
        }
        if ((c.backend_flags & kFirstRead) != 0) return wait_without_buffer(c, false);
        post_full_read(c);
    }

    void post_send(Connection& c, IoData& io) override {
        std::memset(&io.overlapped, 0, sizeof(io.overlapped));
        WSABUF buf;
        buf.len = static_cast<ULONG>(io.unsent());
        buf.buf = io.data() + io.offset;
        DWORD bytes = 0;
        std::lock_guard<std::mutex> g(backend_.lock_for(c));
        if (c.close_requested.load()) {
            ++paths_.failed_at_once;
            return push(Event::Kind::Send, c, &io, -ECANCELED);
        }
        // No read is posted now (nothing for a scan to cancel), and the connection had data.
        c.backend_flags &= ~(kReadFlags | kEmptyMask);
        const bool skip = (c.backend_flags & kSkipOnSuccess) != 0;
        const int rc = ::WSASend(c.sock, &buf, 1, &bytes, 0, &io.overlapped, nullptr);
        finish_post(Event::Kind::Send, c, io, skip, rc, bytes);
    }

    void close(Connection& c) override {
        std::lock_guard<std::mutex> g(backend_.lock_for(c));
        // Operations still pending complete with ERROR_OPERATION_ABORTED, one packet each.
        if (::closesocket(c.sock) != 0) {
            log_error("closesocket", static_cast<unsigned long>(::WSAGetLastError()));
        }
        c.sock = kInvalidSocket;
    }

    void request_close(Connection& c) override {
        std::lock_guard<std::mutex> g(backend_.lock_for(c));
        if (c.sock == kInvalidSocket) return;  // its handler is closing it already
        // ERROR_NOT_FOUND: nothing pending; the handler sees close_requested before posting.
        if (!::CancelIoEx(reinterpret_cast<HANDLE>(c.sock), nullptr)) {
            const DWORD err = ::GetLastError();
            if (err != ERROR_NOT_FOUND) log_error("CancelIoEx", err);
        }
    }

    int buffer_scan_ms() const override { return buffer_scan_ms_; }

    // A read posted with a buffer that was already waiting at the previous scan is cancelled;
    // its completion (on_read_cancelled) gives the buffer back and waits with a zero-byte read.
    // Only reads are cancelled: the flags are cleared, under this lock, by every later post.
    void begin_buffer_scan() override { scan_cancels_left_ = kScanCancels; }

    void scan_buffers(Connection& c) override {
        if (scan_cancels_left_ <= 0) return;
        std::lock_guard<std::mutex> g(backend_.lock_for(c));
        if (c.sock == kInvalidSocket || c.close_requested.load()) return;
        uint32_t& flags = c.backend_flags;
        if ((flags & kFullRead) == 0 || (flags & kReclaiming) != 0) return;
        if ((flags & kSeenWaiting) == 0) {
            flags |= kSeenWaiting;
            return;
        }
        flags |= kReclaiming;
        --scan_cancels_left_;
        // ERROR_NOT_FOUND: the read has completed meanwhile (its completion may still be queued,
        // or a handler still busy with it); it is handled as usual.
        if (::CancelIoEx(reinterpret_cast<HANDLE>(c.sock), nullptr)) {
            ++paths_.reclaims_requested;
        } else {
            const DWORD err = ::GetLastError();
            if (err != ERROR_NOT_FOUND) log_error("CancelIoEx (buffer scan)", err);
        }
    }

    // The core calls this once per worker, when the worker begins its drain; its waits are
    // bounded from then on (see on_wake).
    void stop_accepting() override {
        if (!draining_) {
            draining_ = true;
            backend_.note_worker_draining();
        }
        backend_.stop_accepting();
    }

    // Not while holding wake-ups: another worker may still be blocked without a time limit.
    bool quiescent() const override {
        return ready_.empty() && held_wakes_ == 0 && backend_.accepts_in_flight() == 0;
    }

    void wake() override {
        if (!::PostQueuedCompletionStatus(backend_.port(), 0, kWakeKey, nullptr)) {
            log_error("PostQueuedCompletionStatus", ::GetLastError());
        }
    }

  private:
    // Called with the connection's lock held, close not requested.
    void post_full_read(Connection& c) {
        IoData* io = pool_.acquire();
        if (io == nullptr) return push(Event::Kind::Recv, c, nullptr, -ENOMEM);
        c.backend_flags = (c.backend_flags & ~(kReadFlags | kEmptyMask)) | kFullRead;
        count_buffers(1);
        const bool skip = (c.backend_flags & kSkipOnSuccess) != 0;
        DWORD bytes = 0;
        const int rc = overlapped_read(c, *io, io->capacity, &bytes);
        finish_post(Event::Kind::Recv, c, *io, skip, rc, bytes);
    }

    // Issues an overlapped WSARecv of `len` bytes (0: a zero-byte read) into io's buffer.
    int overlapped_read(Connection& c, IoData& io, uint32_t len, DWORD* bytes) {
        io.conn = &c;
        io.op = Op::Recv;
        std::memset(&io.overlapped, 0, sizeof(io.overlapped));
        WSABUF buf;
        buf.len = static_cast<ULONG>(len);
        buf.buf = io.data();
        DWORD flags = 0;
        return ::WSARecv(c.sock, &buf, 1, bytes, &flags, &io.overlapped, nullptr);
    }

    // Called with the connection's lock held, close not requested: reads what is there already
    // (data, the peer's end or an error: its Recv event is queued), else posts a zero-byte read,
    // whose completion (on_zero_read) comes back here. Exactly one Recv event results.
    // `said_ready`: a zero-byte read has just completed (so there should be something to read).
    void wait_without_buffer(Connection& c, bool said_ready) {
        c.backend_flags &= ~kReadFlags;
        const bool skip = (c.backend_flags & kSkipOnSuccess) != 0;
        for (;;) {
            if (read_now(c)) return;
            if (said_ready) {
                const uint32_t empty = ((c.backend_flags & kEmptyMask) >> kEmptyShift) + 1;
                // Readable, again and again, with nothing to read: wait with a buffer.
                if (empty >= kEmptyZeroReads) return post_full_read(c);
                c.backend_flags = (c.backend_flags & ~kEmptyMask) | (empty << kEmptyShift);
            }
            IoData* io = headers_.acquire();
            if (io == nullptr) return push(Event::Kind::Recv, c, nullptr, -ENOMEM);
            ++paths_.zero_reads;
            DWORD bytes = 0;
            const int rc = overlapped_read(c, *io, 0, &bytes);
            if (rc == 0 && skip) {  // ready at once, and no packet follows: read it now
                ++paths_.inline_success;
                headers_.release(io);
                said_ready = true;
                continue;
            }
            // Pending or a packet anyway: on_zero_read. Failed at once: the error, queued.
            return finish_post(Event::Kind::Recv, c, *io, skip, rc, bytes);
        }
    }

    // One non-blocking read into a fresh buffer. True when a Recv event was queued (bytes, the
    // end, or an error), false when there was nothing to read (WSAEWOULDBLOCK).
    bool read_now(Connection& c) {
        IoData* io = pool_.acquire();
        if (io == nullptr) {
            push(Event::Kind::Recv, c, nullptr, -ENOMEM);
            return true;
        }
        io->conn = &c;
        io->op = Op::Recv;
        WSABUF buf;
        buf.len = static_cast<ULONG>(io->capacity);
        buf.buf = io->data();
        DWORD bytes = 0;
        DWORD flags = 0;
        if (::WSARecv(c.sock, &buf, 1, &bytes, &flags, nullptr, nullptr) == 0) {
            ++paths_.reads_now;
            push(Event::Kind::Recv, c, io, static_cast<int64_t>(bytes));
            return true;
        }
        const int err = ::WSAGetLastError();
        pool_.release(io);
        if (err == WSAEWOULDBLOCK) return false;
        push(Event::Kind::Recv, c, nullptr, -errno_from_native(err));
        return true;
    }

    // A zero-byte read's packet: the connection has something to read (or an error).
    void on_zero_read(Connection& c, IoData& io, int64_t result) {
        headers_.release(&io);
        if (result < 0) return push(Event::Kind::Recv, c, nullptr, result);
        std::lock_guard<std::mutex> g(backend_.lock_for(c));
        if (c.close_requested.load()) return push(Event::Kind::Recv, c, nullptr, -ECANCELED);
        wait_without_buffer(c, true);
    }

    // A read with a buffer ended with ERROR_OPERATION_ABORTED. When scan_buffers cancelled it
    // (and nobody asked to close), it gives its buffer back and the wait goes on without one;
    // returns false otherwise (a close's cancellation: the error goes to the core).
    bool on_read_cancelled(Connection& c, IoData& io) {
        std::lock_guard<std::mutex> g(backend_.lock_for(c));
        if ((c.backend_flags & kReclaiming) == 0 || c.close_requested.load() ||
            c.sock == kInvalidSocket) {
            return false;
        }
        ++paths_.buffers_reclaimed;
        pool_.release(&io);
        wait_without_buffer(c, false);
        return true;
    }

    // Called with the connection's lock held, right after WSARecv/WSASend returned `rc`.
    void finish_post(Event::Kind kind, Connection& c, IoData& io, bool skip, int rc, DWORD bytes) {
        if (rc == 0) {
            if (!skip) {
                ++paths_.success_with_packet;
                return;  // without skip mode the packet is on its way
            }
            ++paths_.inline_success;
            if (kind == Event::Kind::Recv) count_buffers(-1);
            return push(kind, c, &io, static_cast<int64_t>(bytes));
        }
        const int err = ::WSAGetLastError();
        if (err == WSA_IO_PENDING) {
            ++paths_.pending;
            return;
        }
        // Failed at once: no packet will ever come for this IoData.
        ++paths_.failed_at_once;
        if (kind == Event::Kind::Recv) {
            if (io.capacity > 0) count_buffers(-1);
            release(&io);
            return push(kind, c, nullptr, -errno_from_native(err));
        }
        push(kind, c, &io, -errno_from_native(err));
    }

    // Returns how many packets were dequeued (0: the wait timed out).
    ULONG dequeue(ULONG max, int timeout_ms) {
        OVERLAPPED_ENTRY entries[kBatch];
        ULONG n = 0;
        const DWORD timeout = timeout_ms < 0 ? INFINITE : static_cast<DWORD>(timeout_ms);
        if (!::GetQueuedCompletionStatusEx(backend_.port(), entries, max, &n, timeout, FALSE)) {
            const DWORD err = ::GetLastError();
            if (err == WAIT_TIMEOUT) return 0;
            throw make_system_error(errno_from_native(static_cast<int>(err)),
                                    "GetQueuedCompletionStatusEx");
        }
        // A TRUE return says nothing about the entries: each carries its own status.
        for (ULONG i = 0; i < n; ++i) on_packet(entries[i]);
        return n;
    }

    void on_packet(const OVERLAPPED_ENTRY& entry) {
        if (entry.lpOverlapped == nullptr) return on_wake();
        IoData& io = *reinterpret_cast<IoData*>(entry.lpOverlapped);
        if (io.op == Op::Accept) return backend_.on_accept_complete(io, ready_);
        Connection& c = *io.conn;
        ++paths_.packets;
        DWORD bytes = 0;
        // With bWait FALSE the handle is not used; the status is read from the OVERLAPPED.
        const BOOL ok =
            ::GetOverlappedResult(reinterpret_cast<HANDLE>(c.sock), &io.overlapped, &bytes, FALSE);
        DWORD err = ok ? 0 : ::GetLastError();
        // A cancelled read that did receive bytes (not seen with Windows' own TCP provider, whose
        // reads complete whole or not at all) delivers them: dropping them would corrupt the
        // stream without an error.
        if (err == ERROR_OPERATION_ABORTED && io.op == Op::Recv && bytes > 0) err = 0;
        const int64_t result =
            err == 0 ? static_cast<int64_t>(bytes)
                     : -static_cast<int64_t>(errno_from_native(static_cast<int>(err)));
        if (io.op == Op::Recv) {
            if (io.capacity == 0) return on_zero_read(c, io, result);
            count_buffers(-1);
            if (err == ERROR_OPERATION_ABORTED && on_read_cancelled(c, io)) return;
        }
        push(io.op == Op::Recv ? Event::Kind::Recv : Event::Kind::Send, c, &io, result);
    }

    // Reads posted with a buffer and not yet complete, summed over the workers (each worker adds
    // the ones it posted and subtracts the ones it completed): ServerStats::recv_buffers.
    void count_buffers(int64_t n) {
        if (stats_ != nullptr) WorkerStats::add(stats_->recv_buffers, n);
    }

    // Zero-byte reads take their IoData (no buffer) from the header pool.
    void release(IoData* io) {
        if (io->capacity == 0)
            headers_.release(io);
        else
            pool_.release(io);
    }

    // stop() posts one wake-up per worker, but any worker may dequeue any of them. A worker
    // keeps the first it gets; further ones are meant for workers that may still be blocked
    // without a time limit, the ones that have not begun their drain. Passing them on at once
    // made the draining workers (10 ms waits) toss them to each other as fast as the port
    // delivers, for as long as the drain took: a worker that ended its drain without taking its
    // own wake-up, or one held up in a handler, left one over, and stop() spent every CPU on
    // tens of thousands of wake-ups a second. A surplus wake-up is held instead, passed on when
    // a wait of this (draining) worker times out, dropped once every worker drains, and never
    // left behind: quiescent() is false while one is held.
    void on_wake() {
        if (!woken_) {
            woken_ = true;
            return;
        }
        ++held_wakes_;
    }

    void pass_on_held_wakes(bool wait_timed_out) {
        if (backend_.all_workers_draining()) {
            held_wakes_ = 0;  // nobody is blocked without a time limit any more
            return;
        }
        if (!wait_timed_out) return;
        for (; held_wakes_ > 0; --held_wakes_) {
            ++paths_.wakeups_forwarded;
            wake();
        }
    }

    void push(Event::Kind kind, Connection& c, IoData* io, int64_t result) {
        ready_.push(Event::completion(kind, c, io, result));
    }

    IocpBackend& backend_;
    IoDataPool& pool_;
    IoDataPool& headers_;  // IoData without a buffer: zero-byte reads
    const int index_;
    const int buffer_scan_ms_;
    WorkerStats* const stats_;
    int scan_cancels_left_ = 0;  // of the current buffer scan (kScanCancels)
    bool accepts_started_ = false;
    bool woken_ = false;
    bool draining_ = false;
    int held_wakes_ = 0;  // surplus stop() wake-ups dequeued by this worker (on_wake)
    LocalQueue ready_;
    CompletionPaths paths_;
};

}  // namespace

std::unique_ptr<Poller> make_poller(IocpBackend& backend, const PollerContext& ctx) {
    return std::make_unique<IocpPoller>(backend, ctx);
}

}  // namespace iocp
}  // namespace iocpnative
