// io_uring through raw system calls over <linux/io_uring.h>: no liburing, so a wheel needs
// nothing new at build or run time (libuv's src/unix/linux.c does the same). Linux >= 5.11:
// IORING_FEAT_EXT_ARG (a wait timeout passed to io_uring_enter, no timeout SQE) is required;
// everything newer (setup flags, provided buffer rings) is optional and probed.
//
// Memory ordering. The SQ and CQ rings are shared with the kernel, which runs concurrently with
// us (task work on our thread, io-wq threads, softirq completions):
//  * SQ: we write an SQE, then publish it by storing the new SQ tail with release semantics, so
//    the kernel, which loads the tail with acquire, sees the whole SQE. The kernel advances the
//    SQ head as it consumes SQEs; we load that head with acquire before reusing a slot.
//  * CQ: the kernel writes a CQE, then stores the CQ tail with release; we load the tail with
//    acquire before reading the CQEs below it, and store the CQ head with release after copying
//    them out, so the kernel does not overwrite a CQE we are still reading.
// The head and tail words are plain unsigned in the ABI; they are accessed here through
// __atomic builtins on the mapped memory (what liburing's io_uring_smp_* macros expand to).
#pragma once

#include <linux/io_uring.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace iocpnative {
namespace uring {

// IORING_FEAT_MIN_TIMEOUT (Linux 6.12) and IORING_RECV_MULTISHOT (6.0), spelled out: older
// headers lack them.
constexpr uint32_t kFeatMinTimeout = 1u << 15;
constexpr uint16_t kRecvMultishot = 1u << 1;

// Optional features, best first; each can be switched off for tests through the environment
// (IOCPNATIVE_URING_DISABLE, see uring_sys.cpp) to exercise the fallbacks on a new kernel.
struct Features {
    bool defer_taskrun = true;     // IORING_SETUP_DEFER_TASKRUN, Linux >= 6.1
    bool single_issuer = true;     // IORING_SETUP_SINGLE_ISSUER, Linux >= 6.0
    bool coop_taskrun = true;      // IORING_SETUP_COOP_TASKRUN, Linux >= 5.19
    bool submit_all = true;        // IORING_SETUP_SUBMIT_ALL, Linux >= 5.18
    bool multishot_accept = true;  // IORING_ACCEPT_MULTISHOT, Linux >= 5.19
    bool pbuf_ring = true;         // IORING_REGISTER_PBUF_RING, Linux >= 5.19
    bool multishot_recv = true;    // IORING_RECV_MULTISHOT (with pbuf_ring), Linux >= 6.0
    bool min_wait = true;          // IORING_FEAT_MIN_TIMEOUT (batched waits), Linux >= 6.12
    bool poll = true;              // polling before sleeping when saturated (ours, any kernel)
};

// Reads IOCPNATIVE_URING_DISABLE ("all" or a comma list of defer_taskrun, single_issuer,
// coop_taskrun, submit_all, multishot_accept, pbuf_ring, multishot_recv, min_wait, poll) at
// each call.
Features features_from_env();

// True when the running kernel's release (uname) is at least major.minor. For behaviour no
// feature flag announces; false when the release cannot be read.
bool kernel_at_least(int major, int minor) noexcept;

// Why io_uring cannot be used here ("" when it can): the IOCPNATIVE_DISABLE_IO_URING test hook,
// io_uring_setup refused (ENOSYS, EPERM from seccomp or kernel.io_uring_disabled), a kernel
// older than 5.11, or a required opcode missing from IORING_REGISTER_PROBE.
std::string probe();

// One ring: the SQ and CQ mappings and the bookkeeping of what we queued. Not thread-safe; the
// owning worker thread is its only user (after construction, which may happen elsewhere: see
// enable()).
class Ring {
  public:
    // Sets the ring up disabled (IORING_SETUP_R_DISABLED), trying the flag sets allowed by
    // `feat` best first and falling back on EINVAL. Throws SystemError.
    Ring(unsigned sq_entries, unsigned cq_entries, const Features& feat);
    ~Ring();
    Ring(const Ring&) = delete;
    Ring& operator=(const Ring&) = delete;

    // Enables the ring on the calling thread, which becomes its single issuer (SINGLE_ISSUER
    // and DEFER_TASKRUN rings only accept submissions and waits from that task). Idempotent.
    void enable();
    bool enabled() const noexcept { return enabled_; }

    // A zeroed SQE in the next free slot, or nullptr when the SQ is full. The SQE is published
    // to the kernel at the next submit().
    io_uring_sqe* get_sqe() noexcept;
    // SQEs queued but not yet consumed by the kernel.
    unsigned unsubmitted() const noexcept;
    // Free SQ slots.
    unsigned sq_space() const noexcept;

    // One io_uring_enter: submits every queued SQE and, when wait_nr > 0, waits for that many
    // CQEs or timeout_ms (< 0: no limit). Always asks for events, so that DEFER_TASKRUN task work
    // runs. Returns 0, or -errno for the harmless outcomes (ETIME, EINTR, EAGAIN, EBUSY); throws
    // SystemError for anything else. min_wait_us > 0 (Linux >= 6.12, see has_min_wait()) makes
    // wait_nr a batch target: after min_wait_us the call returns once one CQE is there (not
    // before, also with timeout_ms < 0).
    int enter(unsigned wait_nr, int timeout_ms, unsigned min_wait_us = 0);
    // A batch wait for kernels without min_wait: submits, then waits for wait_nr CQEs but no
    // longer than window_us, and returns with what came (-ETIME when the window ran out, maybe
    // with fewer CQEs or none). The caller waits on for one when none came.
    int enter_window(unsigned wait_nr, unsigned window_us);

    // CQ access: ready() is how many CQEs wait; cqe(i) is the i-th of them; consume(n) hands n
    // back to the kernel.
    unsigned ready() const noexcept;
    const io_uring_cqe& cqe(unsigned i) const noexcept;
    void consume(unsigned n) noexcept;

    // io_uring_register; returns 0 or -errno.
    int do_register(unsigned opcode, const void* arg, unsigned nr_args) noexcept;

    uint32_t setup_flags() const noexcept { return flags_; }
    uint32_t kernel_features() const noexcept { return features_; }  // less what Features left out
    // IORING_FEAT_MIN_TIMEOUT (Linux >= 6.12): enter() can take a batch wait.
    bool has_min_wait() const noexcept { return (features_ & kFeatMinTimeout) != 0; }
    // IORING_SETUP_DEFER_TASKRUN (Linux >= 6.1): completions are posted only while we wait, so
    // a wait for several CQEs is not woken by each arrival's task work (see enter_window()).
    bool defers_taskrun() const noexcept { return (flags_ & IORING_SETUP_DEFER_TASKRUN) != 0; }
    // The setup flags in words, for logs and tests ("defer_taskrun single_issuer ...").
    std::string describe_flags() const;

  private:
    int enter_with(unsigned wait_nr, const __kernel_timespec* ts, unsigned min_wait_us);
    void map_rings(const io_uring_params& p);
    void unmap() noexcept;

    int fd_ = -1;
    uint32_t flags_ = 0;
    uint32_t features_ = 0;
    bool enabled_ = false;

    // Mappings (one for SQ+CQ with IORING_FEAT_SINGLE_MMAP, Linux >= 5.4).
    void* sq_ring_ = nullptr;
    size_t sq_ring_size_ = 0;
    void* cq_ring_ = nullptr;
    size_t cq_ring_size_ = 0;
    io_uring_sqe* sqes_ = nullptr;
    size_t sqes_size_ = 0;

    unsigned* sq_khead_ = nullptr;
    unsigned* sq_ktail_ = nullptr;
    unsigned sq_mask_ = 0;
    unsigned sq_entries_ = 0;
    unsigned sqe_tail_ = 0;  // our tail, published at submit

    unsigned* cq_khead_ = nullptr;
    unsigned* cq_ktail_ = nullptr;
    unsigned cq_mask_ = 0;
    io_uring_cqe* cqes_ = nullptr;
};

// A provided buffer ring (IORING_REGISTER_PBUF_RING, Linux >= 5.19): `count` buffers of `size`
// bytes that the kernel picks from when a recv with IOSQE_BUFFER_SELECT finds data, so a recv
// waiting on an idle connection holds no memory. The ring array is page aligned (mmap), as the
// kernel requires; the buffers are one block after it. The ring has room for `capacity` buffers
// and grow() adds more up to that; the block is reserved for all of them at setup, but a buffer
// costs memory (its touched pages) only once the kernel has received into it.
class BufferRing {
  public:
    BufferRing() = default;
    ~BufferRing();
    BufferRing(const BufferRing&) = delete;
    BufferRing& operator=(const BufferRing&) = delete;

    // Registers with `ring` as group `group`; returns 0 or -errno (-EINVAL on kernels < 5.19).
    // `capacity` is a power of two >= `count`.
    int setup(Ring& ring, uint16_t group, unsigned count, unsigned capacity, unsigned size);
    bool active() const noexcept { return array_ != nullptr; }
    uint16_t group() const noexcept { return group_; }
    unsigned size() const noexcept { return size_; }
    unsigned count() const noexcept { return count_; }
    unsigned capacity() const noexcept { return capacity_; }
    char* buffer(unsigned bid) const noexcept { return data_ + static_cast<size_t>(bid) * size_; }
    // Gives buffer `bid` back to the kernel.
    void recycle(unsigned bid) noexcept;
    // Hands buffers count() .. n-1 to the kernel as well (n <= capacity()).
    void grow(unsigned n) noexcept;
    // Frees the memory. Only call once the ring is closed or nothing can select a buffer.
    void release() noexcept;

  private:
    void add(unsigned bid, unsigned slot) noexcept;
    io_uring_buf* entries() const noexcept;
    uint16_t* tail_word() const noexcept;

    void* array_ = nullptr;
    size_t array_bytes_ = 0;
    char* data_ = nullptr;
    unsigned count_ = 0;     // buffers handed to the kernel so far
    unsigned capacity_ = 0;  // ring entries: the most count_ may grow to
    unsigned size_ = 0;
    uint16_t group_ = 0;
    uint16_t tail_ = 0;  // our tail; published with release (see the file comment)
};

}  // namespace uring
}  // namespace iocpnative
