// Internals of the load generator: the state one run shares between its threads, and the
// per-thread runner that owns a slice of the connections (see loadgen.hpp for the method).
#pragma once

#include <atomic>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "iocpnative/platform.hpp"
#include "loadgen.hpp"

#ifndef _WIN32
#include <sys/socket.h>
#endif  // _WIN32

namespace iocpnative {
namespace loadgen {

int64_t now_ns() noexcept;

// Seeded pseudo-random bytes; message m of connection i is the `size` bytes at offset(i, m).
class Payload {
  public:
    Payload(uint64_t seed, size_t size);
    const char* at(size_t offset) const noexcept { return bytes_.data() + offset; }
    size_t offset(uint32_t conn, uint64_t msg) const noexcept;

  private:
    uint64_t seed_;
    size_t span_;  // number of valid start offsets
    std::vector<char> bytes_;
};

// Set by the coordinator, read by every runner.
struct SharedRun {
    const LoadConfig* cfg = nullptr;
    const Payload* payload = nullptr;
    sockaddr_storage addr{};
    socklen_t addr_len = 0;
    int64_t connect_deadline_ns = 0;   // connect + prime must end by then
    std::atomic<int64_t> start_ns{0};  // start of the warm-up; 0 until every runner is ready
    std::atomic<bool> abort{false};    // stop now (progress callback said so, or setup failed)
    int64_t warm_end_ns() const;
    int64_t end_ns() const;
};

// What a runner publishes while it runs (single writer; the coordinator reads).
struct alignas(64) RunnerCounters {
    std::atomic<uint64_t> window_round_trips{0};
    std::atomic<uint64_t> all_round_trips{0};
    std::atomic<uint64_t> errors{0};
    std::atomic<int> open{0};
    std::atomic<bool> ready{false};  // connect + prime done (or given up)
    std::atomic<bool> finished{false};
};

// What a runner hands back once its thread has ended.
struct RunnerResult {
    LatencyHistogram hist;
    std::array<uint64_t, kLoadErrorKinds> errors{};
    std::string first_error;
    double window_cpu_s = 0.0;
    int primed = 0;
    std::string fatal;    // the runner could not start (no poller); empty when fine
    int fatal_errno = 0;  // its errno, when it was a system error
};

// Runs the connections whose global ids are `ids` on the calling thread, then returns.
void run_runner(SharedRun& run, const std::vector<uint32_t>& ids, RunnerCounters& counters,
                RunnerResult& out) noexcept;

}  // namespace loadgen
}  // namespace iocpnative
