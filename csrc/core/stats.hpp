// Per-worker counters. Each worker writes only its own block (so a plain load + store suffices
// and no locked instruction is on the hot path); readers on other threads sum the blocks.
#pragma once

#include <atomic>
#include <cstdint>

namespace iocpnative {

struct alignas(64) WorkerStats {
    std::atomic<int64_t> total_connections{0};
    std::atomic<int64_t> rejected_connections{0};
    std::atomic<int64_t> bytes_received{0};
    std::atomic<int64_t> bytes_sent{0};
    std::atomic<int64_t> handler_errors{0};
    std::atomic<int64_t> recv_buffers{0};  // written by the worker's Poller (io_uring, IOCP)

    static void add(std::atomic<int64_t>& c, int64_t v) noexcept {
        c.store(c.load(std::memory_order_relaxed) + v, std::memory_order_relaxed);
    }
};

}  // namespace iocpnative
