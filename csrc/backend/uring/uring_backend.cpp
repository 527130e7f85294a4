// io_uring backend: the kernel delivers completions as CQEs. Linux >= 5.11 (IORING_FEAT_EXT_ARG,
// see uring_sys.hpp); multishot accept and provided buffer rings need 5.19, the better setup
// flags 5.19 / 6.0 / 6.1, and each falls back when the kernel answers EINVAL.
//
// One ring per worker; a connection stays on the worker that accepted it. Every worker's ring
// holds an accept on the shared listener (multishot, re-armed when the kernel ends it; recent
// kernels arm accept polls with EPOLLEXCLUSIVE, so one connection wakes one ring).
//
// user_data, low 3 bits a tag (IoData and Connection are at least 8-byte aligned):
//   kTagIo       IoData*     recv into the IoData's own buffer, or send (io->op says which)
//   kTagRecvSel  Connection* recv that picks a buffer from the worker's provided buffer ring
//   kTagRecvMulti Connection* multishot recv picking buffers from the ring (see below)
//   kTagAccept / kTagWake / kTagCancel   the accept, the wake-up read, a cancellation
// Per connection (Connection::backend_flags), the core's read -> write -> read rhythm puts at
// most one of its operations in flight: kRecvSel, or kIoOp with backend_io naming the IoData;
// its user_data is the key close() cancels by. Beside it may run the connection's multishot
// recv (kMulti), which close() cancels as well.
//
// Multishot recv (it needs the recv's total byte limit, sqe->optlen, of recent kernels: 6.18 here
// has it; a kernel that refuses it gets one recv at a time): one recv stays armed across the core's
// send, so a message costs no new SQE and no new poll. Its data goes to the core's waiting recv
// (kWant) or, when it comes while the core is still busy with the connection (the peer answered
// before we handled our send's completion, or it pipelines), into the connection's stash, which the
// core's next recv takes first, in order. The byte limit (one buffer) bounds that read-ahead: the
// recv then ends and is armed again only by a recv of the core's with the stash empty, so a peer
// whose replies back up costs at most the blocked reply and one stashed buffer. close() cancels
// it and sets Connection::backend_holds until its last CQE (then Event::Kind::Released).
// Measured side by side (native server, 3-5 runs): server CPU per message -2 % at 30,000/s on
// 50 x 512 B, -5 % at 20,000/s on 1000 x 128 B, -4 % saturated on 50 x 512 B.
//
// Idle memory: with a provided buffer ring a recv waiting on a quiet connection holds no buffer;
// the kernel picks one only when data is there. The bytes are then copied into an IoData from
// the pool and the buffer goes straight back to the ring. The copy (at most one buffer, far
// cheaper than the system call that brought it) buys a fixed ring that is always full, and a
// pool whose counters mean "IoData in flight" as on every other backend. Without a buffer ring
// (kernel < 5.19) a recv gets an IoData of its own. When the ring runs dry (-ENOBUFS: more
// connections had data in one io_uring_enter than the ring has buffers), a recv gets an IoData
// of its own only while few IoData are in use (kOwnRecvLimit); beyond that the connection waits
// in starved_ and its recv is posted again on the next loop iteration, when the batch's buffers
// are back in the ring. Without that bound a burst of a thousand new connections, each sending
// a first message, held a thousand IoData (and their pages) at once. After -ENOBUFS the ring
// also grows with the worker's connections (kConnsPerRecvBuffer), so that many busy connections
// stop meeting an empty ring; a buffer costs memory only once the kernel has received into it.
//
// Batched waits (Linux >= 6.12, IORING_FEAT_MIN_TIMEOUT; emulated from 6.7, below): with
// kBatchMinRecvs or more recvs posted, the worker waits for one completion per kRecvsPerBatched
// recvs posted (at most kBatchCount), but no longer than ServerConfig::batch_wait_us (default 500;
// 0 turns batched waits off); after that any completion ends the wait. At a moderate message rate
// each message otherwise costs a wake-up and a sleep of the worker thread. Measured with peers.py
// (3 rounds) at 30,000 round trips/s on 50 connections, server CPU per message went from 14.6
// to 9.0 us, for about 100 us more median latency; a saturated server finds its batch at once.
// Fewer connections never wait for a batch, so a lone request is answered at once. Each batch wait
// arms a kernel timer, and a window that gathers about one request costs more CPU than it saves
// (measured: 1.08-1.22x the C epoll peer's CPU per message at 5,000/s on 100 connections, and +110
// us p50), so BatchPolicy (wait_policy.hpp) allows them only while the arrival rate fills the
// window with at least 1.25 requests and recent batch waits did gather that many (one busy client
// among idle connections does not).
//
// Without IORING_FEAT_MIN_TIMEOUT (Linux 6.7 to 6.11) wait_window() emulates it: it waits for the
// batch with the window as the wait's own timeout and, when the window brought no completion,
// waits on for one. On a DEFER_TASKRUN ring the kernel posts completions only while we wait and,
// from 6.7 (io_uring/poll: lazy wake-ups), wakes the waiter only once the count is met, so the
// emulation costs one more io_uring_enter than min_wait, and only for an empty window. Before 6.7
// every arrival would wake the waiting thread, so no batch waits there. Measured here (6.18 with
// min_wait switched off, peers.py, 4 rounds): at 30,000/s on 50 x 512 B 6.96 us of server CPU per
// message, against 6.79 with min_wait and 13.04 before (no batch waits without min_wait).
//
// The count is high on purpose: where batching pays, the window ends the wait, not the count. The
// worker then wakes on its own timer; a wait ended by the request that completes the count is woken
// by the client's CPU (an inter-processor interrupt that CPU pays), just as that client goes back
// to sleep, so the replies need another interrupt to wake it. Measured with peers.py (4 rounds, two
// runs) at 30,000/s on 50 connections, waiting for 6 completions (one per 8 recvs, the rule before)
// against 16: 8.14 / 8.10 vs 7.55 / 7.37 us of server CPU per message (0.50x vs 0.47x / 0.45x
// uvloop), client 15.1 vs 13.3 us, p50 232 vs 209 us; interrupts sent from the server's CPU 0.139
// vs 0.081 per message. At 60,000/s on 1000 connections (12 per window) 8 vs 16: 6.92 vs 6.16 us,
// p99 643 vs 502 us. At 20,000/s on 1000 connections, waiting for the 4 a window brings instead of
// 8 gave 11.6 vs 9.0 us (p99 372 vs 412 us). The price shows where the old count was small: at
// 10,000/s on 20 connections (2 per window, the old count 2) 19.9 vs 16.7 us, p50 224 vs 222 us,
// but p99 340 vs 418 us, each wait now holding its first request the whole window. The count still
// ends a wait early in a burst.
//
// The default window, 500 us, is set by what a wake-up costs. On the AMD EPYC VM of the later
// measurements a message cost the server about 8.5 us saturated, and at a fixed rate about 35 us
// more per wait divided by the requests the wait gathered (the slope of the figures below; the
// idle guest halts its CPU, so the host may run other work on it meanwhile). peers.py beside
// c_epoll, 5 rounds (one run): 30,000/s on 50 x 512 B 14.08 us with a 200 us window (0.88x c_epoll
// paired, the window ending most waits), 12.20 with 500 (0.75x), 11.0-11.9 with 1000 (0.76x, 4
// rounds; the count of 12 ending most waits); 20,000/s on 1000 x 128 B 17.24 vs 13.63 us (0.90x vs
// 0.73x), p99 3,916 vs 3,424 us (c_epoll 4,784), p50 309 vs 481 us (c_epoll 171). A longer window
// also lets slower rates batch (BatchPolicy wants 1.25 requests per window): on 100 x 512 B, 3
// rounds, 0.91x vs 1.37x c_epoll at 2,500/s, 0.54x vs 1.26x at 3,500/s, 0.60x vs 1.17x at 5,000/s.
// The price is the median latency at those rates (+110 to +240 us); saturated rows do not change
// (the worker polls). On the Intel VM before it, where wake-ups cost half as much, 200 us already
// gave 0.49x c_epoll at 30,000/s.
//
// It is at most a quarter of the recvs posted because each request a batch wait holds is one the
// client cannot answer yet: saturated on 20 connections (peers.py, 4 rounds, when saturated
// workers still waited for batches), waiting for 16 completions ran at 0.82x the C epoll peer's
// msgs/s (the client 86 % busy), for a quarter (5) at 0.97x. On 50 connections it is 12, which at
// 30,000/s measured as 16 did (6.91 vs 6.98 us, 3 rounds): the window still ends those waits.
//
// Polling (SpinPolicy, wait_policy.hpp): a saturated worker polls the ring for up to kSpinUs
// (20 us) before it sleeps, and waits for no batch meanwhile. Saturated: busy four fifths of a
// span or more, whatever its waits (batch waits included), or, with only plain waits, half of
// them ending within kSpinUs anyway; it goes on polling while 9 in 10 polls find a completion.
// On loopback the client's CPU pays for waking a sleeping server, and in a virtual machine a CPU
// that sleeps waits for the host to run it again; a polling server spares both. Measured with
// peers.py, saturated 50 x 512 B (AMD EPYC VM, 14 rounds of 3 s): polling 1.04x the C epoll
// peer's msgs/s (paired), the build that waited for batches there 0.96x (1.075x paired between
// the two), p99 717 vs 956 us, server CPU 97 % vs 90 % (an earlier run, on another VM, had
// found the two equal within noise: 0.96-0.99x vs 0.99-1.00x in five runs); 1000 x 128 B the same
// within noise (1.02x, 8 rounds); the fixed-rate rows (busy 35-45 %) do not poll: 30,000/s on 50 x
// 512 B and 20,000/s on 1000 x 128 B unchanged (14.1-14.5 vs 14.2-14.5 and 17.0-18.3 vs 16.6-17.8
// us of server CPU per message, 3 rounds, up to 30 % steal). Before batch waits existed, polling
// the plain waits gave 10 x 64 KiB 1.06x, 50 x 512 B 1.04x and 1000 x 128 B 1.04x the msgs/s of the
// same build without it.
//
// Wake-up from other threads: a READ of an eventfd stays posted on the ring and wake() writes
// the eventfd. IORING_OP_MSG_RING would need a ring on the waking thread (stop() runs on a
// Python thread that has none) or Linux >= 6.13 for ring-less sending; an eventfd works on every
// kernel this backend supports. The eventfd is blocking on purpose: io_uring fails a read of an
// O_NONBLOCK file with -EAGAIN instead of waiting. For the same reason accepted sockets stay
// blocking and the listener is switched to blocking (older kernels fail an accept on an
// O_NONBLOCK listener with -EAGAIN; a send on an O_NONBLOCK socket punted to io-wq does too).
//
// Shutdown (DESIGN.md): closing an fd does not cancel its requests, since the ring holds its own
// reference. close() queues an ASYNC_CANCEL keyed by the operation's user_data, and the
// descriptor itself is closed only once every queued SQE has been submitted: an SQE still in
// our queue names the fd by number, and a number closed early could be reused by another
// accept before the SQE reaches the kernel. Keying by user_data is safe against reuse too: the
// cancel is queued before any later SQE could reuse the IoData or Connection address, and the
// kernel processes SQEs in order. (IORING_ASYNC_CANCEL_FD, 5.19, would look the fd up at
// submission and so needs the fd open until then as well; with one operation per connection
// the user_data key is as good and works on every kernel.) stop_accepting() cancels the accept
// and the wake-up read; quiescent() is true only when no accept, wake-up read or cancellation is
// in flight, so the worker frees nothing while the kernel may still complete into it.
#include <errno.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <exception>
#include <utility>
#include <vector>

#include "../../core/net.hpp"
#include "../../core/worker.hpp"
#include "../factories.hpp"
#include "iocpnative/errors.hpp"
#include "uring_sys.hpp"
#include "../wait_policy.hpp"

namespace iocpnative {

namespace {

constexpr uint64_t kTagIo = 0;
constexpr uint64_t kTagRecvSel = 1;
constexpr uint64_t kTagAccept = 2;
constexpr uint64_t kTagWake = 3;
constexpr uint64_t kTagCancel = 4;
constexpr uint64_t kTagRecvMulti = 5;
constexpr uint64_t kTagMask = 7;

constexpr uint32_t kRecvSel = 1u << 0;      // a provided-buffer recv is in flight
constexpr uint32_t kIoOp = 1u << 1;         // backend_io's recv or send is in flight
constexpr uint32_t kClosed = 1u << 2;       // close() was called: results become -ECANCELED
constexpr uint32_t kStarved = 1u << 3;      // waits in starved_ for a provided buffer
constexpr uint32_t kBulk = 1u << 4;         // recvs get an IoData of their own (see kBulkRecvBytes)
constexpr uint32_t kBulkSmall = 1u << 5;    // in bulk mode, the last recv was small
constexpr uint32_t kMulti = 1u << 6;        // a multishot recv is armed (kTagRecvMulti)
constexpr uint32_t kMultiCancel = 1u << 7;  // ... and its cancellation is queued
constexpr uint32_t kWant = 1u << 8;         // the core's recv waits for the multishot's next CQE
constexpr uint32_t kHasEnd = 1u << 9;       // backend_end: EOF/error for the core's next recv

constexpr unsigned kSqEntries = 256;
constexpr unsigned kCqEntries = 4096;  // multishot accepts and bursts of completions
constexpr uint16_t kBufGroup = 0;
// Bytes of provided buffers per worker to start with: 32 buffers at the default 64 KiB
// buffer_size. Address space only until used: a buffer that received a short message costs one
// page. Fewer buffers (16) made a thousand busy connections wait in starved_ (p99 2.7x worse);
// more cost idle memory.
constexpr size_t kBufRingBudget = 2u << 20;
// When recvs find the ring empty (-ENOBUFS), the ring grows to one buffer per kConnsPerRecvBuffer
// connections on the worker, up to kBufRingMaxBuffers; it never shrinks. Measured with peers.py
// on 10,000 connections x 512 B: 32 buffers ran at 0.78x the C epoll peer's msgs/s (19 % of
// recvs met -ENOBUFS), 256 at 0.99x. One per 32 connections (the rule before) left a thousand
// (31 wanted, 32 there) waiting in starved_: saturated on 1000 x 128 B (peers.py, 5 rounds of
// 3 s), one per 16 measured p99 15.9 vs 24.5 ms (0.72x paired; the C epoll peer 19.3 ms) and
// 1.03x the msgs/s; one per 8 did no better (16.2 ms). The price is idle memory, since a burst of
// first messages grows the ring and every buffer it cycles through keeps the page it touched:
// 0.41 vs 0.28 KiB per idle connection at 5,000 (0.63 vs 0.38 at 1,000; 0.91 and 0.56 with 8).
// A worker with fewer than 32 x 16 connections keeps its 32.
constexpr unsigned kConnsPerRecvBuffer = 16;
constexpr unsigned kBufRingMaxBuffers = 512;
constexpr size_t kBufMaxSize = 64u << 10;
// IoData in use beyond which a recv that met -ENOBUFS waits for the ring (see the file comment).
constexpr int64_t kOwnRecvLimit = 32;
// A recv at least this large puts the connection in bulk mode: its next recvs read into an IoData
// of their own, as without a buffer ring, sparing the copy out of the ring (measured with
// peers.py on 10 connections x 64 KiB: 15.7 -> 14.4 us of server CPU per message). Two small
// recvs in a row put it back on the ring (one is the tail of a large message). A connection that
// goes quiet in bulk mode holds one IoData until its next messages or its close.
constexpr int kBulkRecvBytes = 16 * 1024;
constexpr int64_t kBatchMinRecvs = 16;   // batched waits need this many recvs posted
constexpr int64_t kRecvsPerBatched = 4;  // a batch wait waits for one completion per 4 recvs,
constexpr int64_t kBatchCount = 16;      // at most 16 (or for the window)
constexpr int64_t kAcceptPauseMs = 100;  // back-off after EMFILE/ENFILE/ENOBUFS/ENOMEM
constexpr int kBacklogRetryMs = 1;       // longest wait while the kernel refuses queued SQEs

// Power of two between 16 and 256, about kBufRingBudget bytes in all.
unsigned buffer_ring_count(size_t size) {
    const size_t want = std::max<size_t>(16, std::min<size_t>(256, kBufRingBudget / size));
    unsigned n = 16;
    while (n * 2 <= want) n *= 2;
    return n;
}

uint64_t tagged(const void* p, uint64_t tag) {
    return reinterpret_cast<uintptr_t>(p) | tag;
}

class UringPoller final : public Poller {
  public:
    explicit UringPoller(const PollerContext& ctx)
        : pool_(*ctx.pool),
          listener_(ctx.listener),
          feat_(uring::features_from_env()),
          ring_(kSqEntries, kCqEntries, feat_),
          batch_wait_us_(ctx.batch_wait_us),
          stats_(ctx.stats) {
        if (net::set_nonblocking(listener_, false) != 0) {
            throw make_system_error(errno, "fcntl(listener, blocking)");
        }
        wake_fd_ = ::eventfd(0, EFD_CLOEXEC);
        if (wake_fd_ < 0) throw make_system_error(errno, "eventfd");
        if (feat_.pbuf_ring) {
            const size_t size = std::min(pool_.buffer_size(), kBufMaxSize);
            const unsigned count = buffer_ring_count(size);
            const int rc = bufs_.setup(ring_, kBufGroup, count, std::max(count, kBufRingMaxBuffers),
                                       static_cast<unsigned>(size));
            // EINVAL: a kernel older than 5.19; recvs then bring their own IoData.
            if (rc < 0 && rc != -EINVAL) {
                ::close(wake_fd_);
                throw make_system_error(-rc, "io_uring_register(IORING_REGISTER_PBUF_RING)");
            }
        }
        publish_buffer_count();
        can_wait_for_batch_ =
            ring_.has_min_wait() || (ring_.defers_taskrun() && uring::kernel_at_least(6, 7));
        multishot_ = feat_.multishot_accept;
        multishot_recv_ = feat_.multishot_recv && bufs_.active();
        arm_wake();
        arm_accept();
    }

    ~UringPoller() override {
        // After a clean drain nothing is left; if a worker died, give back what it held.
        for (size_t i = head_; i < ready_.size(); ++i) pool_.release(ready_[i].io);
        close_deferred();
        ::close(wake_fd_);
        if (stats_ != nullptr) stats_->recv_buffers.store(0, std::memory_order_relaxed);
        // ring_ is destroyed (closed) before bufs_, its members being declared in that order.
    }

    int wait(Event* out, int max, int timeout_ms) override {
        if (deferred_error_) std::rethrow_exception(std::exchange(deferred_error_, nullptr));
        // The first call runs on the worker thread: it becomes the ring's single issuer.
        ring_.enable();
        grow_if_short();
        retry_starved();
        int n = take_ready(out, max);
        if (!backlog_.empty() || !to_close_.empty()) submit_queued();
        timeout_ms = clamp_for_accept_pause(timeout_ms);
        // SQEs the kernel could not take yet (see submit_queued), and the descriptors waiting for
        // them to close, must not wait for a completion that may never come: wait briefly, then
        // try again.
        if ((!backlog_.empty() || !to_close_.empty()) &&
            (timeout_ms < 0 || timeout_ms > kBacklogRetryMs)) {
            timeout_ms = kBacklogRetryMs;
        }
        const bool have = n > 0 || ring_.ready() > 0;
        bool batched = false;
        // Submit and wait in one io_uring_enter. When completions are already waiting and
        // nothing is queued, skip the system call altogether.
        if (!have || ring_.unsubmitted() > 0) {
            bool block = !have && timeout_ms != 0;
            if (block) end_span_if_due();
            // A worker that polls (saturated) does not wait for batches (see the file comment).
            const bool polling = feat_.poll && spin_policy_.on();
            // Without the kernel's batch timeout, waiting for more than one CQE could wait long.
            int64_t batch = 1;
            if (can_wait_for_batch_ && batch_wait_us_ > 0 && batch_policy_.on() && !polling &&
                recvs_inflight_ >= kBatchMinRecvs) {
                batch = std::min(kBatchCount, recvs_inflight_ / kRecvsPerBatched);
            }
            // Before a batch wait, queued sends are submitted alone: they complete during
            // submission, and the core must see those completions now, not after the wait. With
            // one recv at a time, their connections' next recvs are posted only then (a request
            // arriving meanwhile would wait out two windows; measured with peers.py at 20,000/s
            // on 1000 connections: 11.3 -> 8.5 us of server CPU per message). With multishot
            // recvs, a request arriving before its connection's send completion was handled goes
            // through the stash and an extra loop iteration: submitting the sends with the wait
            // instead measured 9.0-10.1 vs 7.9-8.5 us per message at 30,000/s on 50 connections.
            bool submitted = false;
            if (block && polling) {
                // Poll for up to kSpinUs (io_uring_enter runs the deferred task work).
                const int64_t until = monotonic_us() + waits::kSpinUs;
                do {
                    ring_.enter(0, 0);
                } while (ring_.ready() == 0 && monotonic_us() < until);
                submitted = true;
                block = ring_.ready() == 0;
                spin_policy_.waited(!block);
            }
            if (block && batch > 1 && sends_queued_ && ring_.unsubmitted() > 0) {
                ring_.enter(0, 0);
                submitted = true;
                block = ring_.ready() == 0;
            }
            // Every blocking wait tells SpinPolicy how long the worker slept; the plain waits
            // that could have been polls also whether they ended within kSpinUs.
            const int64_t t0 = block ? monotonic_us() : 0;
            if (block && batch > 1 && !ring_.has_min_wait()) {
                wait_window(static_cast<unsigned>(batch), timeout_ms);
            } else if (block || !submitted) {
                ring_.enter(block ? static_cast<unsigned>(batch) : 0, timeout_ms, batch_wait_us_);
            }
            if (block) {
                const int64_t took = monotonic_us() - t0;
                spin_policy_.slept(took);
                if (feat_.poll && batch == 1 && !polling) {
                    spin_policy_.waited(took < waits::kSpinUs);
                }
            }
            sends_queued_ = false;
            batched = block && batch > 1;
        }
        resume_accept_if_due();
        const int64_t before = batch_policy_.arrivals();
        n += reap(out + n, max - n);
        if (batched) batch_policy_.batch_wait(batch_policy_.arrivals() - before);
        return n;
    }

    // A batch wait without the kernel's min_wait (Linux 6.7 to 6.11): wait for `batch` completions
    // but no longer than the window, and when the window brought none, for the first one up to the
    // rest of the timeout. One more system call than min_wait only for an empty window, which
    // BatchPolicy keeps rare.
    void wait_window(unsigned batch, int timeout_ms) {
        unsigned window = batch_wait_us_;
        if (timeout_ms >= 0 && int64_t{timeout_ms} * 1000 < window) {
            window = static_cast<unsigned>(timeout_ms) * 1000u;  // the backlog's 1 ms cap
        }
        ring_.enter_window(batch, window);
        if (ring_.ready() > 0) return;
        int rest = timeout_ms;
        if (rest > 0) rest = std::max(0, rest - static_cast<int>((window + 999) / 1000));
        ring_.enter(1, rest);
    }

    // At a blocking wait, once kSpanUs or more have gone by since the last: the wait policies
    // decide for the next span (see wait_policy.hpp).
    void end_span_if_due() {
        const int64_t now = monotonic_us();
        const int64_t span = now - span_since_;
        if (span < waits::kSpanUs) return;
        batch_policy_.end_span(span, static_cast<int64_t>(batch_wait_us_));
        spin_policy_.end_span(span);
        span_since_ = now;
    }

    static int64_t monotonic_us() noexcept {
        using namespace std::chrono;
        return duration_cast<microseconds>(steady_clock::now().time_since_epoch()).count();
    }

    int attach(Connection& c) override {
        // Sockets accepted by the ring are blocking (no SOCK_NONBLOCK), as io_uring wants.
        c.backend_flags = 0;
        c.backend_io = nullptr;
        ++conns_;
        return 0;
    }

    void post_recv(Connection& c) override {
        // What a multishot recv brought while the core was busy with c comes first, in order.
        if (IoData* io = pop_stash(c)) return push_ready(Event::Kind::Recv, c, io, io->len);
        if (c.backend_flags & kHasEnd) {
            c.backend_flags &= ~kHasEnd;
            return push_ready(Event::Kind::Recv, c, nullptr, c.backend_end);
        }
        if (c.backend_flags & kMulti) return want(c);  // armed or being cancelled: its CQE answers
        if (!bufs_.active() || (c.backend_flags & kBulk)) return post_recv_own(c);
        if (multishot_recv_) {
            arm_multi(c);
            return want(c);
        }
        io_uring_sqe* sqe = next_sqe();
        sqe->opcode = IORING_OP_RECV;
        sqe->fd = c.sock;
        sqe->len = bufs_.size();
        sqe->flags = IOSQE_BUFFER_SELECT;
        sqe->buf_group = bufs_.group();
        // POLL_FIRST (5.19, as the buffer ring): this recv follows our own reply, so the peer
        // has rarely answered yet; arming the poll at once saves a recv that would find nothing.
        sqe->ioprio = IORING_RECVSEND_POLL_FIRST;
        sqe->user_data = tagged(&c, kTagRecvSel);
        c.backend_flags |= kRecvSel;
        ++recvs_inflight_;
    }

    void post_send(Connection& c, IoData& io) override {
        io.conn = &c;
        io.op = Op::Send;
        io_uring_sqe* sqe = next_sqe();
        sqe->opcode = IORING_OP_SEND;
        sqe->fd = c.sock;
        sqe->addr = reinterpret_cast<uintptr_t>(io.data() + io.offset);
        sqe->len = io.unsent();
        sqe->msg_flags = MSG_NOSIGNAL;
        sqe->user_data = tagged(&io, kTagIo);
        c.backend_io = &io;
        c.backend_flags |= kIoOp;
        sends_queued_ = true;
    }

    void close(Connection& c) override {
        // A starved connection has nothing in the kernel: retry_starved() completes its recv.
        if (c.backend_flags & kRecvSel) {
            queue_cancel(tagged(&c, kTagRecvSel));
        } else if (c.backend_flags & kIoOp) {
            queue_cancel(tagged(c.backend_io, kTagIo));
        }
        // A multishot recv (armed beside a send, or answering the core's recv) refers to c until
        // its last CQE: c stays allocated until then (on_recv_multi reports the release).
        if (c.backend_flags & kMulti) {
            cancel_multi(c);
            c.backend_holds = true;
        }
        while (IoData* io = pop_stash(c)) pool_.release(io);
        c.backend_flags &= ~kHasEnd;
        c.backend_flags |= kClosed;
        --conns_;
        to_close_.push_back(c.sock);  // closed once the SQEs naming it are submitted
        c.sock = kInvalidSocket;
    }

    void stop_accepting() override {
        if (stopping_) return;
        stopping_ = true;
        accept_resume_ms_ = 0;
        if (accept_inflight_) queue_cancel(kTagAccept);
        if (wake_inflight_) queue_cancel(kTagWake);
    }

    bool quiescent() const override {
        return head_ == ready_.size() && !accept_inflight_ && !wake_inflight_ &&
               cancels_inflight_ == 0 && backlog_.empty() && starved_head_ == starved_.size();
    }

    void wake() override {
        const uint64_t one = 1;
        // Cannot block: the counter would have to reach 2^64 - 2 first.
        (void)!::write(wake_fd_, &one, sizeof(one));
    }

  private:
    // --- queueing SQEs ---------------------------------------------------------------------

    // A zeroed SQE to fill. When the SQ is full, submits what is queued (no waiting) and, if
    // the kernel cannot take it yet, queues into backlog_, which keeps the order of operations.
    io_uring_sqe* next_sqe() {
        if (backlog_.empty()) {
            io_uring_sqe* sqe = ring_.get_sqe();
            if (sqe == nullptr && ring_.enabled()) {
                ring_.enter(0, 0);
                sqe = ring_.get_sqe();
            }
            if (sqe != nullptr) return sqe;
        }
        backlog_.emplace_back();
        std::memset(&backlog_.back(), 0, sizeof(io_uring_sqe));
        return &backlog_.back();
    }

    void flush_backlog() {
        size_t i = 0;
        for (; i < backlog_.size(); ++i) {
            io_uring_sqe* sqe = ring_.get_sqe();
            if (sqe == nullptr) break;
            *sqe = backlog_[i];
        }
        backlog_.erase(backlog_.begin(), backlog_.begin() + static_cast<std::ptrdiff_t>(i));
    }

    void queue_cancel(uint64_t key) {
        io_uring_sqe* sqe = next_sqe();
        sqe->opcode = IORING_OP_ASYNC_CANCEL;
        sqe->fd = -1;
        sqe->addr = key;
        sqe->user_data = kTagCancel;
        ++cancels_inflight_;
    }

    // Posts the provided-buffer recv again for up to one ring's worth of starved connections
    // (more would only meet -ENOBUFS again); a closed one gets its recv's -ECANCELED instead.
    void retry_starved() {
        const size_t end = std::min(starved_.size(), starved_head_ + bufs_.count());
        for (; starved_head_ < end; ++starved_head_) {
            Connection& c = *starved_[starved_head_];
            c.backend_flags &= ~kStarved;
            if (c.backend_flags & kClosed) {
                push_ready(Event::Kind::Recv, c, nullptr, -ECANCELED);
            } else {
                post_recv(c);
            }
        }
        if (starved_head_ == starved_.size()) {
            starved_.clear();
            starved_head_ = 0;
        }
    }

    // After recvs met an empty ring: one buffer per kConnsPerRecvBuffer connections (see there).
    void grow_if_short() {
        if (enobufs_ == 0) return;
        enobufs_ = 0;
        const unsigned want = static_cast<unsigned>(
            std::min<int64_t>(conns_ / kConnsPerRecvBuffer, bufs_.capacity()));
        if (want <= bufs_.count()) return;
        bufs_.grow(want);
        publish_buffer_count();
    }

    void publish_buffer_count() {
        if (stats_ != nullptr) stats_->recv_buffers.store(bufs_.count(), std::memory_order_relaxed);
    }

    // Data arrived while every provided buffer was taken: read it into an IoData of its own, or,
    // with many in use already, wait for the buffers this batch gives back.
    void recv_without_buffer(Connection& c) {
        if (pool_.in_use() < kOwnRecvLimit) return post_recv_own(c);
        c.backend_flags |= kStarved;
        starved_.push_back(&c);
    }

    void post_recv_own(Connection& c) {
        IoData* io = pool_.acquire();
        if (io == nullptr) return push_ready(Event::Kind::Recv, c, nullptr, -ENOMEM);
        io->conn = &c;
        io->op = Op::Recv;
        io_uring_sqe* sqe = next_sqe();
        sqe->opcode = IORING_OP_RECV;
        sqe->fd = c.sock;
        sqe->addr = reinterpret_cast<uintptr_t>(io->data());
        sqe->len = io->capacity;
        sqe->user_data = tagged(io, kTagIo);
        c.backend_io = io;
        c.backend_flags |= kIoOp;
        ++recvs_inflight_;
    }

    void arm_accept() {
        io_uring_sqe* sqe = next_sqe();
        sqe->opcode = IORING_OP_ACCEPT;
        sqe->fd = listener_;
        sqe->accept_flags = SOCK_CLOEXEC;
        if (multishot_) sqe->ioprio = IORING_ACCEPT_MULTISHOT;
        sqe->user_data = kTagAccept;
        accept_inflight_ = true;
    }

    void arm_wake() {
        io_uring_sqe* sqe = next_sqe();
        sqe->opcode = IORING_OP_READ;
        sqe->fd = wake_fd_;
        sqe->addr = reinterpret_cast<uintptr_t>(&wake_buf_);
        sqe->len = sizeof(wake_buf_);
        sqe->user_data = kTagWake;
        wake_inflight_ = true;
    }

    // --- completions ----------------------------------------------------------------------

    // Handles the CQEs that are there, up to `max` events. Release of the CQ head happens once,
    // after the batch.
    int reap(Event* out, int max) {
        const unsigned avail = ring_.ready();
        unsigned i = 0;
        int n = 0;
        for (; i < avail && n < max; ++i) {
            const io_uring_cqe cqe = ring_.cqe(i);
            try {
                if (on_cqe(cqe, out[n])) ++n;
            } catch (...) {
                // Thrown out of here, the error would lose the events already in `out` and leave
                // the ring's head where it was, so that the worker's recovery handled these CQEs
                // twice. The CQE counts as handled; the error reaches the worker on the next wait.
                if (!deferred_error_) deferred_error_ = std::current_exception();
            }
        }
        ring_.consume(i);
        return n;
    }

    // Returns true when the CQE became an Event in `ev`.
    bool on_cqe(const io_uring_cqe& cqe, Event& ev) {
        const uint64_t ud = cqe.user_data;
        switch (ud & kTagMask) {
            case kTagIo:
                return on_io_done(*reinterpret_cast<IoData*>(ud), cqe.res, ev);
            case kTagRecvSel:
                return on_recv_selected(*reinterpret_cast<Connection*>(ud & ~kTagMask), cqe.res,
                                        cqe.flags, ev);
            case kTagRecvMulti:
                return on_recv_multi(*reinterpret_cast<Connection*>(ud & ~kTagMask), cqe.res,
                                     cqe.flags, ev);
            case kTagAccept:
                return on_accept(cqe.res, cqe.flags, ev);
            case kTagWake:
                on_wake(cqe.res);
                return false;
            case kTagCancel:
                --cancels_inflight_;  // 0, -ENOENT (already done) or -EALREADY: all fine
                return false;
            default:
                std::fprintf(stderr, "iocpnative: io_uring CQE with unknown tag %llu\n",
                             static_cast<unsigned long long>(ud & kTagMask));
                return false;
        }
    }

    bool on_io_done(IoData& io, int res, Event& ev) {
        Connection& c = *io.conn;
        c.backend_flags &= ~kIoOp;
        c.backend_io = nullptr;
        // A send that finished before its cancellation keeps its byte count (they were sent);
        // a recv's bytes on a closed connection are dropped.
        if (io.op == Op::Send) return make_event(ev, Event::Kind::Send, c, &io, res);
        --recvs_inflight_;
        if ((c.backend_flags & kClosed) && res >= 0) res = -ECANCELED;
        if (res < 0) {
            pool_.release(&io);
            return make_event(ev, Event::Kind::Recv, c, nullptr, res);
        }
        io.len = static_cast<uint32_t>(res);
        note_recv(c, res);
        return make_event(ev, Event::Kind::Recv, c, &io, res);
    }

    bool on_recv_selected(Connection& c, int res, uint32_t flags, Event& ev) {
        c.backend_flags &= ~kRecvSel;
        --recvs_inflight_;
        const bool closed = (c.backend_flags & kClosed) != 0;
        const bool has_buf = (flags & IORING_CQE_F_BUFFER) != 0;
        const unsigned bid = flags >> IORING_CQE_BUFFER_SHIFT;
        if (res == -ENOBUFS) ++enobufs_;
        if (res == -ENOBUFS && !closed) {
            recv_without_buffer(c);
            return false;
        }
        if (closed && res >= 0) res = -ECANCELED;
        if (res > 0 && !has_buf) res = -EIO;  // the kernel broke its own contract
        IoData* io = nullptr;
        if (res > 0) {
            io = pool_.acquire();
            if (io == nullptr) {
                res = -ENOMEM;
            } else {
                std::memcpy(io->data(), bufs_.buffer(bid), static_cast<size_t>(res));
                io->conn = &c;
                io->op = Op::Recv;
                io->len = static_cast<uint32_t>(res);
                note_recv(c, res);
            }
        }
        if (has_buf) bufs_.recycle(bid);
        return make_event(ev, Event::Kind::Recv, c, io, res);
    }

    // A multishot recv's CQE. Data goes to the core's waiting recv (kWant), else to the stash
    // that post_recv() hands out first; an end (EOF, error) likewise. It ends without being the
    // connection's end after our own cancellation (read-ahead bound, bulk mode), -ENOBUFS, or
    // -EINVAL from a kernel without multishot recv: a waiting recv is then posted anew.
    bool on_recv_multi(Connection& c, int res, uint32_t flags, Event& ev) {
        const bool more = (flags & IORING_CQE_F_MORE) != 0;
        const bool has_buf = (flags & IORING_CQE_F_BUFFER) != 0;
        const unsigned bid = flags >> IORING_CQE_BUFFER_SHIFT;
        if (more) multi_seen_ = true;
        if (!more) c.backend_flags &= ~(kMulti | kMultiCancel);
        const bool closed = (c.backend_flags & kClosed) != 0;
        const bool waiting = (c.backend_flags & kWant) != 0;
        if (res > 0 && !has_buf) res = -EIO;  // the kernel broke its own contract
        IoData* io = nullptr;
        if (res > 0 && !closed) {
            io = take_data(c, bid, res, waiting);
            if (io == nullptr && waiting) res = -ENOMEM;
        }
        if (has_buf) bufs_.recycle(bid);
        if (closed) {
            if (more) return false;  // the cancellation's last CQE is still to come
            // The core clears backend_holds when it handles Released: a Send completion of c
            // earlier in this batch must not free c before then.
            if (!waiting) {
                ev = Event::released(c);
                return true;
            }
            // The core's recv was waiting on it: nothing else of c is in flight.
            c.backend_holds = false;
            unwant(c);
            return make_event(ev, Event::Kind::Recv, c, nullptr, -ECANCELED);
        }
        if (res > 0) {
            if (!waiting) return false;  // stashed by take_data()
            unwant(c);
            return make_event(ev, Event::Kind::Recv, c, io, res);
        }
        // A kernel without multishot recv (< 6.0) or without its byte limit refuses it (-EINVAL)
        // before any has worked: one recv at a time then.
        const bool refused = res == -EINVAL && !multi_seen_;
        if (refused) multishot_recv_ = false;
        if (res == -ENOBUFS) ++enobufs_;
        if (res == -ECANCELED || res == -ENOBUFS || refused) {
            if (!waiting) return false;  // the core's next post_recv() arms a new one
            unwant(c);
            if (res == -ENOBUFS) {
                recv_without_buffer(c);
            } else {
                post_recv(c);
            }
            return false;
        }
        // EOF or the connection's error (or -ENOMEM: no IoData for the data).
        if (!waiting) {
            c.backend_end = res;
            c.backend_flags |= kHasEnd;
            cancel_multi(c);
            return false;
        }
        unwant(c);
        return make_event(ev, Event::Kind::Recv, c, nullptr, res);
    }

    // Copies a multishot recv's `n` bytes out of ring buffer `bid`: into a fresh IoData for the
    // waiting recv, else onto the end of the stash (filling its last IoData first). Returns the
    // IoData, or nullptr when the pool has no memory (a stash then ends with -ENOMEM).
    IoData* take_data(Connection& c, unsigned bid, int n, bool waiting) {
        const char* src = bufs_.buffer(bid);
        auto len = static_cast<uint32_t>(n);
        note_recv(c, n);
        if (c.backend_flags & kBulk) cancel_multi(c);  // bulk mode reads into its own IoData
        IoData* tail = nullptr;
        if (!waiting) {
            for (IoData* p = c.backend_stash; p != nullptr; p = p->next_free) tail = p;
            if (tail != nullptr) {
                const uint32_t fit = std::min(len, tail->capacity - tail->len);
                std::memcpy(tail->data() + tail->len, src, fit);
                tail->len += fit;
                src += fit;
                len -= fit;
                if (len == 0) return tail;
            }
        }
        IoData* io = pool_.acquire();
        if (io == nullptr) {
            if (!waiting) {
                c.backend_end = -ENOMEM;
                c.backend_flags |= kHasEnd;
                cancel_multi(c);
            }
            return nullptr;
        }
        std::memcpy(io->data(), src, len);
        io->conn = &c;
        io->op = Op::Recv;
        io->len = len;
        if (waiting) return io;
        if (tail != nullptr) {
            tail->next_free = io;
        } else {
            c.backend_stash = io;
        }
        return io;
    }

    // The oldest stashed IoData of c (or nullptr), unlinked.
    static IoData* pop_stash(Connection& c) {
        IoData* io = c.backend_stash;
        if (io != nullptr) {
            c.backend_stash = io->next_free;
            io->next_free = nullptr;
        }
        return io;
    }

    void arm_multi(Connection& c) {
        io_uring_sqe* sqe = next_sqe();
        sqe->opcode = IORING_OP_RECV;
        sqe->fd = c.sock;
        sqe->len = 0;  // each CQE brings at most one buffer
        // Read-ahead bound: the recv ends after one buffer's worth of bytes (sqe->optlen, which
        // shares file_index's place; recent kernels only, older ones refuse it with -EINVAL and the
        // connection falls back to one recv at a time). The core's next recv arms it again.
        sqe->file_index = bufs_.size();
        sqe->flags = IOSQE_BUFFER_SELECT;
        sqe->buf_group = bufs_.group();
        sqe->ioprio = uring::kRecvMultishot | IORING_RECVSEND_POLL_FIRST;
        sqe->user_data = tagged(&c, kTagRecvMulti);
        c.backend_flags |= kMulti;
    }

    void cancel_multi(Connection& c) {
        if (!(c.backend_flags & kMulti) || (c.backend_flags & kMultiCancel)) return;
        c.backend_flags |= kMultiCancel;
        queue_cancel(tagged(&c, kTagRecvMulti));
    }

    void want(Connection& c) {
        c.backend_flags |= kWant;
        ++recvs_inflight_;
    }

    void unwant(Connection& c) {
        c.backend_flags &= ~kWant;
        --recvs_inflight_;
    }

    bool on_accept(int res, uint32_t flags, Event& ev) {
        if (!(flags & IORING_CQE_F_MORE)) accept_inflight_ = false;
        bool produced = false;
        if (res >= 0) {
            if (stopping_) {
                ::close(res);  // raced with the cancellation: no Accepted after stop_accepting
            } else {
                ev = Event{};
                ev.kind = Event::Kind::Accepted;
                ev.accepted = res;
                produced = true;
            }
        } else if (res == -EINVAL && multishot_) {
            multishot_ = false;  // Linux < 5.19 rejects IORING_ACCEPT_MULTISHOT
        } else if (res == -EMFILE || res == -ENFILE || res == -ENOBUFS || res == -ENOMEM ||
                   res == -EINVAL || res == -EBADF || res == -ENOTSOCK) {
            // Out of descriptors or memory, or a broken listener: retrying at once would spin,
            // so step back; pending connections wait in the backlog meanwhile.
            std::fprintf(stderr, "iocpnative: accept paused for %lld ms: %s\n",
                         static_cast<long long>(kAcceptPauseMs),
                         make_system_error(-res, "io_uring accept").what());
            accept_resume_ms_ = monotonic_ms() + kAcceptPauseMs;
        }
        // Anything else (ECONNABORTED, EPROTO, EPERM, EINTR, an unexpected ECANCELED) is one
        // failed connection: accept the next.
        if (!stopping_ && !accept_inflight_ && accept_resume_ms_ == 0) arm_accept();
        return produced;
    }

    void on_wake(int res) {
        wake_inflight_ = false;
        if (stopping_) return;
        if (res < 0) throw make_system_error(-res, "io_uring read(eventfd)");
        arm_wake();
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
        if (!stopping_ && !accept_inflight_) arm_accept();
    }

    // --- helpers --------------------------------------------------------------------------

    // Every recv that brought data: counted for the batch wait, sized for bulk mode.
    void note_recv(Connection& c, int res) {
        batch_policy_.arrival();
        if (res >= kBulkRecvBytes) {
            c.backend_flags = (c.backend_flags | kBulk) & ~kBulkSmall;
        } else if (c.backend_flags & kBulkSmall) {
            c.backend_flags &= ~(kBulk | kBulkSmall);
        } else if (c.backend_flags & kBulk) {
            c.backend_flags |= kBulkSmall;
        }
    }

    static bool make_event(Event& ev, Event::Kind kind, Connection& c, IoData* io, int64_t result) {
        ev = Event::completion(kind, c, io, result);
        return true;
    }

    void push_ready(Event::Kind kind, Connection& c, IoData* io, int64_t result) {
        ready_.push_back(Event::completion(kind, c, io, result));
    }

    int take_ready(Event* out, int max) {
        int n = 0;
        while (n < max && head_ < ready_.size()) out[n++] = ready_[head_++];
        if (head_ == ready_.size()) {
            ready_.clear();
            head_ = 0;
        }
        return n;
    }

    // Before a wait: moves the backlog into the SQ, submitting as often as that takes, so that the
    // wait's io_uring_enter submits every SQE queued (one left in the backlog would reach the
    // kernel only after the wait, i.e. after some other completion); then closes the descriptors
    // of closed connections once every SQE queued before (which may name them) has reached the
    // kernel, submitting first if needed, or a peer would not see the close until some other
    // completion woke us. When the kernel takes no more (EAGAIN without memory, or, on older
    // kernels, EBUSY while overflowed CQEs cannot be flushed), what is left waits for the next
    // call, after the next reap.
    void submit_queued() {
        flush_backlog();
        for (;;) {
            const unsigned queued = ring_.unsubmitted();
            const size_t spilled = backlog_.size();
            if (queued == 0 && spilled == 0) return close_deferred();
            if (spilled == 0 && to_close_.empty()) return;  // the wait submits the SQ
            ring_.enter(0, 0);
            flush_backlog();
            if (ring_.unsubmitted() >= queued && backlog_.size() >= spilled) return;
        }
    }

    void close_deferred() noexcept {
        for (socket_t s : to_close_) net::close_socket(s);
        to_close_.clear();
    }

    IoDataPool& pool_;
    const int listener_;
    const uring::Features feat_;
    uring::BufferRing bufs_;  // declared before ring_: freed after the ring is closed
    uring::Ring ring_;
    const unsigned batch_wait_us_;
    // Batch waits need the kernel's min_wait, or wait_window() on a DEFER_TASKRUN ring of Linux
    // 6.7 or later (see the file comment).
    bool can_wait_for_batch_ = false;
    int wake_fd_ = -1;
    uint64_t wake_buf_ = 0;
    bool multishot_ = true;
    bool multishot_recv_ = true;
    bool multi_seen_ = false;  // a multishot recv has produced a CQE with IORING_CQE_F_MORE
    bool stopping_ = false;
    std::exception_ptr deferred_error_;  // thrown while reaping; rethrown by the next wait()
    bool accept_inflight_ = false;
    bool wake_inflight_ = false;
    bool sends_queued_ = false;  // a send was queued since wait() last submitted
    int64_t accept_resume_ms_ = 0;
    size_t cancels_inflight_ = 0;
    std::vector<io_uring_sqe> backlog_;  // SQEs waiting for room in the SQ, in order
    std::vector<socket_t> to_close_;     // descriptors to close after the next submission
    std::vector<Event> ready_;           // completions made up here (no IoData: -ENOMEM)
    size_t head_ = 0;
    std::vector<Connection*> starved_;  // waiting for a provided buffer, oldest first
    size_t starved_head_ = 0;
    int64_t recvs_inflight_ = 0;  // recvs in the kernel, for the batch wait
    int64_t conns_ = 0;           // attached and not yet closed, for the buffer ring's size
    int64_t enobufs_ = 0;         // recvs that found the ring empty since grow_if_short()
    int64_t span_since_ = 0;      // monotonic_us() when the wait policies' span began
    waits::BatchPolicy batch_policy_;
    waits::SpinPolicy spin_policy_;
    WorkerStats* const stats_;
};

class UringBackend final : public Backend {
  public:
    const char* name() const override { return "io_uring"; }
    std::unique_ptr<Poller> make_poller(const PollerContext& ctx) override {
        return std::make_unique<UringPoller>(ctx);
    }
};

}  // namespace

std::unique_ptr<Backend> make_uring_backend() {
    return std::make_unique<UringBackend>();
}

std::string probe_uring() {
    return uring::probe();
}

}  // namespace iocpnative
