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
#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstring>
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
// Connection::backend_flags: this socket has FILE_SKIP_COMPLETION_PORT_ON_SUCCESS set.
constexpr uint32_t kSkipOnSuccess = 1u << 0;

class IocpPoller final : public Poller {
  public:
    IocpPoller(IocpBackend& backend, const PollerContext& ctx)
        : backend_(backend), pool_(*ctx.pool), index_(ctx.index) {}

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
        return 0;
    }

    void post_recv(Connection& c) override {
        IoData* io = pool_.acquire();
        if (io == nullptr) return push(Event::Kind::Recv, c, nullptr, -ENOMEM);
        io->conn = &c;
        io->op = Op::Recv;
        std::memset(&io->overlapped, 0, sizeof(io->overlapped));
        WSABUF buf;
        buf.len = static_cast<ULONG>(io->capacity);
        buf.buf = io->data();
        DWORD bytes = 0;
        DWORD flags = 0;
        std::lock_guard<std::mutex> g(backend_.lock_for(c));
        if (c.close_requested.load()) {
            pool_.release(io);
            ++paths_.failed_at_once;
            return push(Event::Kind::Recv, c, nullptr, -ECANCELED);
        }
        const bool skip = (c.backend_flags & kSkipOnSuccess) != 0;
        const int rc = ::WSARecv(c.sock, &buf, 1, &bytes, &flags, &io->overlapped, nullptr);
        finish_post(Event::Kind::Recv, c, *io, skip, rc, bytes);
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
    // Called with the connection's lock held, right after WSARecv/WSASend returned `rc`.
    void finish_post(Event::Kind kind, Connection& c, IoData& io, bool skip, int rc, DWORD bytes) {
        if (rc == 0) {
            if (!skip) {
                ++paths_.success_with_packet;
                return;  // without skip mode the packet is on its way
            }
            ++paths_.inline_success;
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
            pool_.release(&io);
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
        const int64_t result =
            ok ? static_cast<int64_t>(bytes)
               : -static_cast<int64_t>(errno_from_native(static_cast<int>(::GetLastError())));
        push(io.op == Op::Recv ? Event::Kind::Recv : Event::Kind::Send, c, &io, result);
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
    const int index_;
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
