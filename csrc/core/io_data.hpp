// IoData: the one object that every I/O operation in flight owns, and the pool that hands it out.
//
// Lifetime rule (DESIGN.md): an IoData goes back to the pool only after the last completion for
// it has been seen, the cancellation completion included. A backend never frees one when it
// closes a socket; the kernel's (or the emulated) completion is what releases it.
//
// Memory layout: one allocation per IoData, header followed by `capacity` buffer bytes, so a
// recv lands in memory adjacent to the header it belongs to. On Windows the OVERLAPPED is the
// first member: the IOCP backend converts the OVERLAPPED* it dequeues back to the IoData with
// a plain cast (asio derives its operation from OVERLAPPED for the same reason). On io_uring the
// IoData's address is the SQE's user_data.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <mutex>

#include "iocpnative/platform.hpp"

namespace iocpnative {

struct Connection;

enum class Op : uint8_t { None, Accept, Recv, Send };

struct IoData {
#ifdef _WIN32
    OVERLAPPED overlapped;  // must stay first: IOCP hands back this address
#endif                      // _WIN32
    Connection* conn = nullptr;
    IoData* next_free = nullptr;
    Op op = Op::None;
    uint32_t capacity = 0;                    // buffer bytes after the header
    uint32_t len = 0;                         // valid bytes in the buffer
    uint32_t offset = 0;                      // bytes of [0, len) already sent
    socket_t accept_socket = kInvalidSocket;  // IOCP AcceptEx: the socket being accepted

    char* data() noexcept { return reinterpret_cast<char*>(this + 1); }
    const char* data() const noexcept { return reinterpret_cast<const char*>(this + 1); }
    // Bytes of the buffer still to send.
    uint32_t unsent() const noexcept { return len - offset; }
};

// Counters one pool keeps. Written by the pool's owner (under the lock for a shared pool),
// read by any thread.
struct PoolCounters {
    std::atomic<int64_t> in_use{0};
    std::atomic<int64_t> allocated{0};
};

// Fixed-size IoData blocks with a LIFO free list (the block released last is the one in cache).
// A per-worker pool is used by one thread only and takes no lock; a pool shared by several
// threads (IOCP, whose completions may arrive on any worker) is created with `shared = true`.
// At most `max_cached` free blocks are kept, and never more than kMaxCachedBytes of them; the rest
// go back to the allocator, so a burst of connections does not pin its peak memory (256 cached
// 64 KiB blocks would be 16 MiB per worker). The destructor frees every cached block; blocks still
// in use at destruction are a bug that the counters (and LSan) report.
class IoDataPool {
  public:
    static constexpr size_t kMaxCachedBytes = 1u << 20;
    IoDataPool(size_t buffer_size, bool shared, size_t max_cached = 256);
    ~IoDataPool();
    IoDataPool(const IoDataPool&) = delete;
    IoDataPool& operator=(const IoDataPool&) = delete;

    // Returns a reset IoData (len = offset = 0, op = None), or nullptr when memory is exhausted.
    IoData* acquire();
    // Gives `io` back. Must be the final use of `io` by the caller.
    void release(IoData* io) noexcept;
    // Frees every cached free block (stop() calls it; so does the destructor).
    void trim() noexcept;

    size_t buffer_size() const noexcept { return buffer_size_; }
    int64_t in_use() const noexcept { return counters_.in_use.load(std::memory_order_relaxed); }
    int64_t allocated() const noexcept {
        return counters_.allocated.load(std::memory_order_relaxed);
    }

  private:
    IoData* acquire_unlocked();
    void release_unlocked(IoData* io) noexcept;
    static void add(std::atomic<int64_t>& c, int64_t v) noexcept {
        // Single writer (or writer under lock_): a plain load/store avoids a locked RMW on the
        // hot path while readers on other threads still see a whole value.
        c.store(c.load(std::memory_order_relaxed) + v, std::memory_order_relaxed);
    }

    const size_t buffer_size_;
    const bool shared_;
    const size_t max_cached_;
    IoData* free_ = nullptr;
    size_t cached_ = 0;
    std::mutex lock_;
    PoolCounters counters_;
};

}  // namespace iocpnative
