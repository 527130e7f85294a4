// Server configuration and the statistics snapshot, as seen by every front end
// (Python bindings, native tools, C++ tests).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace iocpnative {

// Timeouts at or beyond this many seconds (about 31 years) mean "never". Converting larger ones
// to milliseconds or to steady_clock ticks would overflow their integer types.
constexpr double kNeverSeconds = 1e9;

// Worker threads a server may have: each owns a poller, a pool and a connection table, built
// before any socket opens, so a mistyped count (1e8) would spend a minute allocating them.
constexpr int kMaxWorkers = 1024;

// 500 us: on the AMD VM of the later measurements a worker's wake-up costs about as much server
// CPU as four echoed messages, and a 200 us window gathered too few of them at 20,000-30,000
// round trips/s (uring_backend.cpp has the figures).
constexpr int kDefaultBatchWaitUs = 500;
constexpr int kMaxBatchWaitUs = 1000000;

struct ServerConfig {
    std::string host = "127.0.0.1";
    uint16_t port = 6000;          // 0 picks a free port
    int workers = 0;               // 0 = number of CPUs
    std::string backend = "auto";  // "auto", "epoll", "io_uring", "iocp"
    size_t buffer_size = 65536;    // bytes per IoData buffer (one recv at most this much)
    size_t max_connections = 10000;
    double idle_timeout = 0.0;  // seconds; <= 0 means never
    // io_uring on Linux >= 6.7, and epoll: with many receives posted, how long a worker may wait
    // for a small batch of completions before answering what it has (one wake-up per batch
    // instead of one per message: less CPU at moderate rates, up to this much more latency). 0
    // answers every completion at once. IOCP and older kernels never wait for a batch.
    int batch_wait_us = kDefaultBatchWaitUs;
    bool verbose = false;  // log connects and disconnects to stderr, like the seed
    int backlog = 1024;
};

// Counters summed over the workers, each worker's read in turn with relaxed loads: on a running
// server not one snapshot (bytes_sent may briefly be ahead of bytes_received). Readable before,
// during and after stop(); final after it, and after a clean stop pool_in_use and pool_allocated
// are 0.
struct ServerStats {
    int64_t active_connections = 0;
    int64_t total_connections = 0;
    int64_t rejected_connections = 0;
    int64_t bytes_received = 0;
    int64_t bytes_sent = 0;
    int64_t pool_in_use = 0;     // IoData handed out and not yet returned
    int64_t pool_allocated = 0;  // IoData blocks allocated (in use + cached free)
    int64_t handler_errors = 0;
    // Receive buffers handed to the kernel: io_uring's provided buffer rings (grow with the number
    // of busy connections), IOCP's reads posted with a buffer (waiting connections use zero-byte
    // reads); 0 on epoll and after stop().
    int64_t recv_buffers = 0;
};

// Throws std::invalid_argument naming the bad field and what is allowed.
void validate(const ServerConfig& cfg);

}  // namespace iocpnative
