// IOCP backend, shared part: one completion port for all workers, the listener's pre-posted
// AcceptEx operations, and the per-connection locks that make cross-thread closes safe.
// Windows 7 SP1 / Server 2008 R2 SP1 or later (GetQueuedCompletionStatusEx and CancelIoEx: Vista;
// SetFileCompletionNotificationModes: Vista; WSA_FLAG_NO_HANDLE_INHERIT in net::open_socket:
// 7 SP1); wine >= 7 for the tests run here.
//
// Threads: every worker waits on the same port, so a connection's completions may be handled on
// any worker (asio's win_iocp_io_context, libuv's uv_loop on Windows use one port the same way).
// The core keeps at most one operation in flight per connection, so one thread at a time handles
// a connection; the only cross-thread actions are request_close() (stop, idle scans) and the
// accept re-posts, both guarded here.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "../../core/io_data.hpp"
#include "../backend.hpp"
#include "iocpnative/platform.hpp"

#include <mswsock.h>

namespace iocpnative {
namespace iocp {

// Completion keys: which handle a packet belongs to. The OVERLAPPED (first member of IoData)
// says which operation.
constexpr ULONG_PTR kConnectionKey = 1;
constexpr ULONG_PTR kListenerKey = 2;
constexpr ULONG_PTR kWakeKey = 3;

// AcceptEx writes the local and the remote address, each followed by 16 spare bytes.
constexpr DWORD kAcceptAddressBytes = sizeof(sockaddr_storage) + 16;

// Completions that did not come from the port: an immediate success on a handle with
// FILE_SKIP_COMPLETION_PORT_ON_SUCCESS (the OS queues no packet) or an immediate failure (the
// OS never queues one). The worker that posted the operation returns them from its next wait(),
// never by calling back into the core from inside a post (no recursion).
class LocalQueue {
  public:
    void push(const Event& e) { events_.push_back(e); }
    bool empty() const { return head_ == events_.size(); }
    int take(Event* out, int max);
    // Gives back what a worker that stopped abnormally left queued.
    void discard(IoDataPool& pool) noexcept;

  private:
    std::vector<Event> events_;
    size_t head_ = 0;
};

class IocpBackend;

// One per worker (iocp_poller.cpp).
std::unique_ptr<Poller> make_poller(IocpBackend& backend, const PollerContext& ctx);

// Reports a failure that has no caller to throw to (a worker thread's background work).
void log_error(const char* what, unsigned long native_error);

class IocpBackend final : public Backend {
  public:
    IocpBackend();
    ~IocpBackend() override;
    const char* name() const override { return "iocp"; }
    bool shared_queue() const override { return true; }
    std::unique_ptr<Poller> make_poller(const PollerContext& ctx) override;

    HANDLE port() const { return port_; }
    bool skip_on_success() const { return skip_on_success_; }
    std::mutex& lock_for(const Connection& c) {
        return conn_locks_[(reinterpret_cast<uintptr_t>(&c) / alignof(Connection)) % kConnLocks];
    }

    // --- the listener ---------------------------------------------------------------------
    // Posts the initial accepts (called once, from worker 0's thread).
    void start_accepting();
    // Handles a dequeued accept completion: fills `ready` with an Accepted event on success and
    // re-posts the accept (parks it when it failed, retires it after stop_accepting()).
    void on_accept_complete(IoData& io, LocalQueue& ready);
    // Cancels every pending accept (later completions retire them) and retires the parked ones.
    // Idempotent, any thread.
    void stop_accepting();
    // Accepts posted or parked, not yet retired.
    int64_t accepts_in_flight() const { return accepts_in_flight_.load(); }
    // Called once by each worker's poller when the worker begins its drain (any thread).
    void note_worker_draining() { workers_draining_.fetch_add(1); }
    // True once every worker drains: none blocks without a time limit any more.
    bool all_workers_draining() const { return workers_draining_.load() >= workers_; }
    // Shortens a worker's wait so that it ends when the parked accepts are due again.
    int clamp_for_accept_pause(int timeout_ms) const;
    // Posts the parked accepts again once their pause is over. Any worker, after its wait.
    void resume_accepts_if_due();

  private:
    void init_listener(const PollerContext& ctx);
    // Posts `io` as an AcceptEx; parks it when that is impossible.
    void post_accept(IoData& io);
    void park_accept(IoData& io, const char* what, unsigned long native_error);
    void retire_accept(IoData& io);

    static constexpr size_t kConnLocks = 64;

    HANDLE port_ = nullptr;
    socket_t listener_ = kInvalidSocket;
    int family_ = AF_INET;
    IoDataPool* pool_ = nullptr;
    LPFN_ACCEPTEX accept_ex_ = nullptr;
    bool skip_on_success_ = false;
    int accept_count_ = 0;
    int workers_ = 1;
    std::atomic<int> workers_draining_{0};
    bool started_ = false;

    std::mutex accept_lock_;  // orders re-posts against stop_accepting()'s cancel
    bool accepting_ = true;
    std::atomic<int64_t> accepts_in_flight_{0};
    int64_t accepts_completed_ = 0;  // under accept_lock_, for iocp_stats.hpp
    int64_t accept_resets_ = 0;
    int64_t accept_pauses_ = 0;
    // Accepts that failed while accepting: in no OS call, their socket closed, waiting for
    // accept_resume_ms_ (under accept_lock_; both vectors keep room for every accept, so parking
    // never allocates). accept_resume_ms_ is 0 when none is parked; workers read it unlocked to
    // bound their waits.
    std::vector<IoData*> parked_accepts_;
    std::vector<IoData*> resuming_accepts_;
    std::atomic<int64_t> accept_resume_ms_{0};
    int64_t next_pause_log_ms_ = 0;  // under accept_lock_: at most one "paused" line a second
    int64_t pause_logs_skipped_ = 0;
    // AcceptEx address buffers, one per pre-posted accept (the IoData's own buffer may be
    // smaller than two addresses: buffer_size can be 1). IoData::offset holds the slot index.
    std::vector<std::unique_ptr<char[]>> address_slots_;

    std::mutex conn_locks_[kConnLocks];
};

}  // namespace iocp
}  // namespace iocpnative
