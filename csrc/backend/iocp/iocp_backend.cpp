// IOCP backend, shared part: the completion port, the listener and its AcceptEx operations.
// Windows 7 SP1 or later (see iocp_backend.hpp); wine >= 7.
//
// Accepts: several AcceptEx operations are posted up front with a receive length of 0, so each
// completes as soon as a connection arrives rather than waiting for its first bytes (a client
// that connects and says nothing must not occupy an accept). Every completion, success or
// failure, re-posts the same IoData until stop_accepting(). The listener does not use
// FILE_SKIP_COMPLETION_PORT_ON_SUCCESS, so every posted accept yields exactly one packet.
//
// An accept that cannot be posted (WSASocketW out of handles or buffers, AcceptEx failing at
// once, a storm of peers resetting first) or that completes with an error of its own is parked
// and posted again kAcceptPauseMs later, from the wait of whichever worker wakes first, as the
// epoll and io_uring backends pause accepting on EMFILE. Retiring it instead would lose the slot
// for good: after a few such failures the server would accept nothing more while it still runs.
// Pending connections wait in the listen backlog meanwhile. Only stop_accepting() retires.
#include "iocp_backend.hpp"

#include "iocp_stats.hpp"

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <atomic>
#include <mutex>

#include "../../core/net.hpp"
#include "../../core/worker.hpp"
#include "../factories.hpp"
#include "iocpnative/errors.hpp"

namespace iocpnative {

namespace iocp {

namespace {

constexpr int kMinAccepts = 4;
constexpr int kMaxAccepts = 64;
constexpr int kAcceptResetRetries = 16;
constexpr int64_t kAcceptPauseMs = 100;  // back-off before a parked accept is posted again
// Every parked accept may fail again after each pause: one log line a second at most.
constexpr int64_t kAcceptPauseLogMs = 1000;

// FILE_SKIP_COMPLETION_PORT_ON_SUCCESS is only safe when every provider in the socket's chain
// hands out real kernel handles (no non-IFS layered service provider): libuv checks the same
// XP1_IFS_HANDLES bit. IOCPNATIVE_IOCP_SKIP_ON_SUCCESS=0 turns the mode off (the tests run both).
bool skip_on_success_usable(socket_t s) {
    const char* env = std::getenv("IOCPNATIVE_IOCP_SKIP_ON_SUCCESS");
    if (env != nullptr && std::strcmp(env, "0") == 0) return false;
    WSAPROTOCOL_INFOW info;
    int len = static_cast<int>(sizeof(info));
    if (::getsockopt(s, SOL_SOCKET, SO_PROTOCOL_INFOW, reinterpret_cast<char*>(&info), &len) != 0) {
        return false;
    }
    return (info.dwServiceFlags1 & XP1_IFS_HANDLES) != 0;
}

// An accept that fails because its peer reset before it completed: ERROR_NETNAME_DELETED on
// Windows (python/cpython#93821), ERROR_UNEXP_NET_ERR under wine 8. It concerns that connection
// only: the listener stays open and the accept is posted again. (ERROR_OPERATION_ABORTED is
// stop_accepting()'s cancel.)
bool peer_gone(DWORD err) {
    return err == ERROR_NETNAME_DELETED || err == ERROR_UNEXP_NET_ERR ||
           err == ERROR_CONNECTION_ABORTED;
}

LPFN_ACCEPTEX load_accept_ex(socket_t s) {
    GUID guid = WSAID_ACCEPTEX;
    LPFN_ACCEPTEX fn = nullptr;
    DWORD bytes = 0;
    if (::WSAIoctl(s, SIO_GET_EXTENSION_FUNCTION_POINTER, &guid, sizeof(guid), &fn, sizeof(fn),
                   &bytes, nullptr, nullptr) != 0) {
        throw make_system_error(last_socket_error(),
                                "WSAIoctl(SIO_GET_EXTENSION_FUNCTION_POINTER)");
    }
    return fn;
}

std::mutex g_paths_lock;
CompletionPaths g_paths;
std::atomic<int64_t> g_parked_accepts{0};  // parked now, every backend of the process

}  // namespace

int64_t parked_accepts() {
    return g_parked_accepts.load();
}

CompletionPaths completion_paths() {
    std::lock_guard<std::mutex> g(g_paths_lock);
    return g_paths;
}

void add_completion_paths(const CompletionPaths& p) {
    std::lock_guard<std::mutex> g(g_paths_lock);
    g_paths.pending += p.pending;
    g_paths.inline_success += p.inline_success;
    g_paths.success_with_packet += p.success_with_packet;
    g_paths.failed_at_once += p.failed_at_once;
    g_paths.packets += p.packets;
    g_paths.accepts_completed += p.accepts_completed;
    g_paths.accept_resets += p.accept_resets;
    g_paths.accept_pauses += p.accept_pauses;
    g_paths.wakeups_forwarded += p.wakeups_forwarded;
    g_paths.zero_reads += p.zero_reads;
    g_paths.reads_now += p.reads_now;
    g_paths.reclaims_requested += p.reclaims_requested;
    g_paths.buffers_reclaimed += p.buffers_reclaimed;
}

void log_error(const char* what, unsigned long native_error) {
    const int err = errno_from_native(static_cast<int>(native_error));
    std::fprintf(stderr, "iocpnative: %s failed: %s (Windows error %lu)\n", what,
                 std::strerror(err), native_error);
}

int LocalQueue::take(Event* out, int max) {
    int n = 0;
    while (n < max && head_ < events_.size()) out[n++] = events_[head_++];
    if (head_ == events_.size()) {
        events_.clear();
        head_ = 0;
    }
    return n;
}

void LocalQueue::discard(IoDataPool& pool) noexcept {
    for (size_t i = head_; i < events_.size(); ++i) {
        const Event& e = events_[i];
        if (e.kind == Event::Kind::Accepted)
            net::close_socket(e.accepted);
        else
            pool.release(e.io);
    }
    events_.clear();
    head_ = 0;
}

IocpBackend::IocpBackend() {
    net::ensure_initialized();
    // 0 concurrent threads = one per CPU may run at once; extra workers wait their turn.
    port_ = ::CreateIoCompletionPort(INVALID_HANDLE_VALUE, nullptr, 0, 0);
    if (port_ == nullptr) {
        throw make_system_error(errno_from_native(static_cast<int>(::GetLastError())),
                                "CreateIoCompletionPort");
    }
}

IocpBackend::~IocpBackend() {
    // After a clean stop every accept has been retired; otherwise their IoData stay allocated
    // on purpose (the OS may still write to them) and the pool counters show it.
    if (accepts_in_flight_.load() != 0) {
        std::fprintf(stderr, "iocpnative: iocp backend destroyed with %lld accepts in flight\n",
                     static_cast<long long>(accepts_in_flight_.load()));
    }
    CompletionPaths p;
    p.accepts_completed = accepts_completed_;
    p.accept_resets = accept_resets_;
    p.accept_pauses = accept_pauses_;
    add_completion_paths(p);
    ::CloseHandle(port_);
}

std::unique_ptr<Poller> IocpBackend::make_poller(const PollerContext& ctx) {
    if (pool_ == nullptr) init_listener(ctx);
    return iocp::make_poller(*this, ctx);
}

void IocpBackend::init_listener(const PollerContext& ctx) {
    sockaddr_storage addr{};
    int len = static_cast<int>(sizeof(addr));
    if (::getsockname(ctx.listener, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
        throw make_system_error(last_socket_error(), "getsockname(listener)");
    }
    accept_ex_ = load_accept_ex(ctx.listener);
    if (::CreateIoCompletionPort(reinterpret_cast<HANDLE>(ctx.listener), port_, kListenerKey, 0) ==
        nullptr) {
        throw make_system_error(errno_from_native(static_cast<int>(::GetLastError())),
                                "CreateIoCompletionPort(listener)");
    }
    family_ = addr.ss_family;
    listener_ = ctx.listener;
    // AcceptEx writes the addresses into address_slots_: its IoData needs no buffer.
    pool_ = ctx.header_pool != nullptr ? ctx.header_pool : ctx.pool;
    skip_on_success_ = skip_on_success_usable(ctx.listener);
    workers_ = ctx.workers;
    accept_count_ = std::min(kMaxAccepts, std::max(kMinAccepts, 2 * ctx.workers));
    for (int i = 0; i < accept_count_; ++i) {
        address_slots_.push_back(std::make_unique<char[]>(2 * kAcceptAddressBytes));
    }
    parked_accepts_.reserve(static_cast<size_t>(accept_count_));
    resuming_accepts_.reserve(static_cast<size_t>(accept_count_));
}

void IocpBackend::start_accepting() {
    std::lock_guard<std::mutex> g(accept_lock_);
    if (started_ || !accepting_) return;
    started_ = true;
    for (int i = 0; i < accept_count_; ++i) {
        IoData* io = pool_->acquire();
        if (io == nullptr) {
            log_error("allocating an accept operation", ERROR_NOT_ENOUGH_MEMORY);
            break;
        }
        io->op = Op::Accept;
        io->offset = static_cast<uint32_t>(i);
        accepts_in_flight_.fetch_add(1);
        post_accept(*io);
    }
}

// Called with accept_lock_ held, while accepting_.
void IocpBackend::post_accept(IoData& io) {
    char* addresses = address_slots_[io.offset].get();
    for (int attempt = 0; attempt < kAcceptResetRetries; ++attempt) {
        const socket_t s = net::open_socket(family_, SOCK_STREAM, IPPROTO_TCP);
        if (s == INVALID_SOCKET) {
            return park_accept(io, "WSASocketW for AcceptEx",
                               static_cast<unsigned long>(::WSAGetLastError()));
        }
        std::memset(&io.overlapped, 0, sizeof(io.overlapped));
        io.accept_socket = s;
        DWORD bytes = 0;
        // TRUE (a connection was waiting) or WSA_IO_PENDING: either way one packet follows.
        if (accept_ex_(listener_, s, addresses, 0, kAcceptAddressBytes, kAcceptAddressBytes, &bytes,
                       &io.overlapped)) {
            return;
        }
        const int err = ::WSAGetLastError();
        if (err == WSA_IO_PENDING) return;
        // An immediate failure queues no packet: the IoData is still ours.
        net::close_socket(s);
        io.accept_socket = kInvalidSocket;
        if (err == WSAECONNRESET) continue;  // that peer reset before we took it: next one
        return park_accept(io, "AcceptEx", static_cast<unsigned long>(err));
    }
    park_accept(io, "AcceptEx (peers kept resetting)", WSAECONNRESET);
}

// Called with accept_lock_ held, while accepting_; `io` is in no OS call and owns no socket.
void IocpBackend::park_accept(IoData& io, const char* what, unsigned long native_error) {
    parked_accepts_.push_back(&io);
    g_parked_accepts.fetch_add(1);
    ++accept_pauses_;
    const int64_t now = monotonic_ms();
    // Accepts parked during one pause are posted again together, when the first one is due.
    if (accept_resume_ms_.load() == 0) accept_resume_ms_.store(now + kAcceptPauseMs);
    if (now < next_pause_log_ms_) {
        ++pause_logs_skipped_;
        return;
    }
    next_pause_log_ms_ = now + kAcceptPauseLogMs;
    const int err = errno_from_native(static_cast<int>(native_error));
    char skipped[64] = "";  // filled without allocating: memory may be what ran out
    if (pause_logs_skipped_ > 0) {
        std::snprintf(skipped, sizeof(skipped), " (and %lld more since the last report)",
                      static_cast<long long>(pause_logs_skipped_));
    }
    std::fprintf(
        stderr, "iocpnative: accept paused for %lld ms: %s failed: %s (Windows error %lu)%s\n",
        static_cast<long long>(kAcceptPauseMs), what, std::strerror(err), native_error, skipped);
    pause_logs_skipped_ = 0;
}

int IocpBackend::clamp_for_accept_pause(int timeout_ms) const {
    const int64_t due = accept_resume_ms_.load();
    if (due == 0) return timeout_ms;
    const int64_t left = due - monotonic_ms();
    const int wait = left <= 0 ? 0 : static_cast<int>(std::min<int64_t>(left, kAcceptPauseMs));
    return (timeout_ms < 0 || wait < timeout_ms) ? wait : timeout_ms;
}

void IocpBackend::resume_accepts_if_due() {
    const int64_t due = accept_resume_ms_.load();
    if (due == 0 || monotonic_ms() < due) return;
    std::lock_guard<std::mutex> g(accept_lock_);
    // Another worker may have resumed them (and some parked again) since the unlocked read.
    const int64_t now_due = accept_resume_ms_.load();
    if (!accepting_ || now_due == 0 || monotonic_ms() < now_due) return;
    accept_resume_ms_.store(0);
    // post_accept may park an accept again: it goes back into parked_accepts_, not this list.
    resuming_accepts_.swap(parked_accepts_);
    g_parked_accepts.fetch_sub(static_cast<int64_t>(resuming_accepts_.size()));
    for (IoData* io : resuming_accepts_) post_accept(*io);
    resuming_accepts_.clear();
}

void IocpBackend::retire_accept(IoData& io) {
    pool_->release(&io);
    accepts_in_flight_.fetch_sub(1);
}

void IocpBackend::on_accept_complete(IoData& io, LocalQueue& ready) {
    DWORD bytes = 0;
    const BOOL ok =
        ::GetOverlappedResult(reinterpret_cast<HANDLE>(listener_), &io.overlapped, &bytes, FALSE);
    const DWORD err = ok ? 0 : ::GetLastError();
    const socket_t s = io.accept_socket;
    io.accept_socket = kInvalidSocket;
    if (ok) {
        // Gives the new socket the listener's properties; getpeername/shutdown need it.
        if (::setsockopt(s, SOL_SOCKET, SO_UPDATE_ACCEPT_CONTEXT,
                         reinterpret_cast<const char*>(&listener_), sizeof(listener_)) == 0) {
            Event e;
            e.kind = Event::Kind::Accepted;
            e.accepted = s;
            ready.push(e);
        } else {
            log_error("setsockopt(SO_UPDATE_ACCEPT_CONTEXT)",
                      static_cast<unsigned long>(::WSAGetLastError()));
            net::close_socket(s);
        }
    } else {
        net::close_socket(s);
    }
    std::lock_guard<std::mutex> g(accept_lock_);
    ++accepts_completed_;
    if (!ok && peer_gone(err)) ++accept_resets_;
    if (!accepting_) return retire_accept(io);  // ERROR_OPERATION_ABORTED: stop's cancel
    // Any other failure (out of handles or memory, a listener in trouble) would most likely
    // come back at once and spin: the same pause as for a post that failed.
    if (!ok && !peer_gone(err)) return park_accept(io, "AcceptEx completion", err);
    post_accept(io);
}

void IocpBackend::stop_accepting() {
    std::lock_guard<std::mutex> g(accept_lock_);
    if (!accepting_) return;
    accepting_ = false;
    // Parked accepts are in no OS call: retired now. No worker posts them again (accepting_).
    for (IoData* io : parked_accepts_) retire_accept(*io);
    g_parked_accepts.fetch_sub(static_cast<int64_t>(parked_accepts_.size()));
    parked_accepts_.clear();
    accept_resume_ms_.store(0);
    // Cancels the accepts posted from every thread; each then completes (aborted) and is
    // retired by on_accept_complete. ERROR_NOT_FOUND: none was pending.
    if (accepts_in_flight_.load() > 0 &&
        !::CancelIoEx(reinterpret_cast<HANDLE>(listener_), nullptr)) {
        const DWORD err = ::GetLastError();
        if (err != ERROR_NOT_FOUND) log_error("CancelIoEx(listener)", err);
    }
}

}  // namespace iocp

std::unique_ptr<Backend> make_iocp_backend() {
    return std::make_unique<iocp::IocpBackend>();
}

std::string probe_iocp() {
    try {
        net::ensure_initialized();
    } catch (const std::exception& e) {
        return e.what();
    }
    HANDLE port = ::CreateIoCompletionPort(INVALID_HANDLE_VALUE, nullptr, 0, 0);
    if (port == nullptr) {
        return make_system_error(errno_from_native(static_cast<int>(::GetLastError())),
                                 "CreateIoCompletionPort")
            .what();
    }
    ::CloseHandle(port);
    return "";
}

}  // namespace iocpnative
