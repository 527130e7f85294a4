// The native load generator behind `python -m iocpnative bench` and iocpnative.bench().
//
// N connections, spread over T threads, each run a ping-pong loop against an echo server (or
// keep `pipeline` messages in flight): send `size` bytes, wait for exactly that many back,
// compare every byte with what was sent, send the next. The payload of message m on connection
// i is a slice of a seeded pseudo-random pool at an offset hashed from (seed, i, m), so dropped,
// duplicated, stale or flipped bytes are all caught.
//
// Phases: connect (at most kMaxConnecting handshakes in flight per thread) and prime (one
// unmeasured echo per connection), both bounded by connect_timeout_s; then warm-up (not
// counted) and the measured window. Only round trips that complete inside the window count.
// The whole run is bounded by connect_timeout_s + warmup_s + duration_s (+ a 100 ms tick), and
// stops by itself.
//
// With rate > 0 the offered load is fixed: message m of connection i is due at
// t0 + (m * C + i) / rate (t0 = start of the warm-up), so each connection sends every C / rate
// seconds and connections are staggered by 1 / rate. A connection that is behind sends as soon
// as its previous answer is in, and latency is measured from the scheduled time: a server that
// falls behind shows the queueing it causes (no coordinated omission).
//
// Linux: one edge-triggered epoll set per thread. Windows: WSAPoll per thread (a portable
// fallback: its cost grows with the connections of a thread, fine for a functional check).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace iocpnative {

struct LoadConfig {
    std::string host = "127.0.0.1";
    uint16_t port = 0;
    int connections = 50;
    size_t size = 512;        // bytes per message, >= 1
    double duration_s = 5.0;  // measured window
    double warmup_s = 1.0;    // not counted
    double rate = 0.0;        // round trips/s over all connections; 0 = as fast as possible
    int threads = 1;
    int pipeline = 1;                 // messages in flight per connection
    double connect_timeout_s = 10.0;  // connect + prime
    double stall_timeout_s = 5.0;     // an answer later than this is an error (stalled)
    uint64_t seed = 0x10c9a71e5eedULL;
};

// Limits: times become int64 nanoseconds (a million seconds, 11.6 days, is far from overflow);
// a billion round trips/s is beyond any one machine (the schedule only needs a period > 0).
constexpr double kMaxLoadSeconds = 1e6;
constexpr double kMaxLoadRate = 1e9;

// Throws std::invalid_argument naming the bad field.
void validate(const LoadConfig& cfg);

// Error kinds, counted per connection event (one corrupt message counts once).
enum class LoadError : int {
    ConnectFailed = 0,  // refused, unreachable, or not connected within connect_timeout_s
    Reset,              // ECONNRESET / EPIPE while sending or receiving
    UnexpectedEof,      // the server closed while the load was running
    Corrupt,            // an echoed byte differs from the byte sent (one per message)
    Excess,             // bytes arrived that were never sent (one per arrival)
    Stalled,            // an answer took longer than stall_timeout_s (or prime timed out)
    Other,              // any other socket error
    Count
};
const char* load_error_name(LoadError e) noexcept;
constexpr int kLoadErrorKinds = static_cast<int>(LoadError::Count);

// Log-linear latency histogram in ns: 2^kSubBits linear buckets per power of two, so a value
// is reported as its bucket's upper edge with a relative error below 2^-kSubBits (0.8 %).
class LatencyHistogram {
  public:
    static constexpr unsigned kSubBits = 7;
    static constexpr unsigned kSub = 1u << kSubBits;
    static constexpr unsigned kMaxExp = 42;  // values up to 2^43 ns (about 2.4 h)
    static constexpr unsigned kBuckets = (kMaxExp - kSubBits + 2) * kSub;

    LatencyHistogram() : counts_(kBuckets, 0) {}
    void add(uint64_t ns) noexcept;
    void merge(const LatencyHistogram& other);
    uint64_t count() const noexcept { return total_; }
    uint64_t max() const noexcept { return max_; }
    double mean() const noexcept { return total_ ? sum_ / static_cast<double>(total_) : 0.0; }
    // The value at quantile q in [0, 1] (bucket upper edge, never above max()); 0 when empty.
    uint64_t quantile(double q) const noexcept;

    static unsigned index(uint64_t v) noexcept;
    static uint64_t upper_edge(unsigned idx) noexcept;

  private:
    std::vector<uint64_t> counts_;
    uint64_t total_ = 0;
    uint64_t max_ = 0;
    double sum_ = 0.0;
};

struct LoadProgress {
    const char* phase = "";     // "connect", "warmup", "measure", "done"
    double elapsed_s = 0.0;     // since the start of the run
    uint64_t round_trips = 0;   // completed in the measured window so far
    double recent_per_s = 0.0;  // round trips/s over the last progress interval (any phase)
    uint64_t errors = 0;
    int open_connections = 0;
};

struct LoadResult {
    uint64_t round_trips = 0;  // completed inside the measured window
    double window_s = 0.0;     // the measured window as it actually ran
    double requests_per_s = 0.0;
    double mb_per_s = 0.0;  // payload one way, 10^6 B/s
    double p50_us = 0, p90_us = 0, p99_us = 0, p999_us = 0, max_us = 0, mean_us = 0;
    std::array<uint64_t, kLoadErrorKinds> error_counts{};
    uint64_t errors = 0;       // sum of error_counts
    int connections_open = 0;  // connected and primed when the clock started
    double connect_s = 0.0;    // connect + prime
    double rate_target = 0.0;
    double client_cpu_s = 0.0;  // CPU time of the load threads during the window
    std::string first_error;    // the first error seen, for a one-line report ("" when none)
};

// Called on the calling thread about once per second while the load runs. Returning false
// stops the run early (the result then covers what was measured).
using LoadProgressFn = std::function<bool(const LoadProgress&)>;

// Runs the load; blocks the calling thread (which only watches the clock and reports
// progress). Throws std::invalid_argument for a bad config or an unresolvable host, and
// SystemError when a thread's poller cannot be created. Connection failures are not thrown:
// they are counted in the result.
LoadResult run_load(const LoadConfig& cfg, const LoadProgressFn& progress = nullptr);

}  // namespace iocpnative
