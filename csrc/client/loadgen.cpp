// The load generator's coordinator (threads, phases, progress, the merged result), its
// histogram and its payload. The per-thread I/O is in loadgen_runner.cpp.
#include "loadgen.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <thread>

#include "../core/net.hpp"
#include "iocpnative/errors.hpp"
#include "loadgen_runner.hpp"

#ifndef _WIN32
#include <netdb.h>
#include <sys/resource.h>
#endif  // _WIN32

namespace iocpnative {

namespace {

constexpr int64_t kProgressNs = 1000 * 1000 * 1000;
constexpr auto kCoordinatorTick = std::chrono::milliseconds(20);

// A 64-bit finaliser (the splitmix64 output function): turns a counter into well-mixed bits.
uint64_t mix64(uint64_t z) noexcept {
    z += 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

bool finite_at_least(double v, double lo) {
    return std::isfinite(v) && v >= lo;
}

// A run with many connections needs a descriptor each (twice that when the server runs in the
// same process); raise the soft limit towards the hard one instead of failing at 1024.
void raise_nofile(int connections) {
#ifndef _WIN32
    rlimit rl{};
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0) return;
    const rlim_t want = static_cast<rlim_t>(connections) * 2 + 256;
    if (rl.rlim_cur >= want) return;
    rl.rlim_cur = (rl.rlim_max == RLIM_INFINITY || rl.rlim_max >= want) ? want : rl.rlim_max;
    (void)setrlimit(RLIMIT_NOFILE, &rl);  // best effort: failures show as connect errors
#else
    (void)connections;
#endif  // _WIN32
}

void resolve(const LoadConfig& cfg, loadgen::SharedRun& run) {
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_protocol = IPPROTO_TCP;
    addrinfo* res = nullptr;
    const std::string service = std::to_string(cfg.port);
    const int gai = ::getaddrinfo(cfg.host.c_str(), service.c_str(), &hints, &res);
    if (gai != 0 || res == nullptr) {
        throw std::invalid_argument("cannot resolve host '" + cfg.host +
                                    "': " + std::string(gai_strerror(gai)));
    }
    std::memcpy(&run.addr, res->ai_addr, res->ai_addrlen);
    run.addr_len = static_cast<socklen_t>(res->ai_addrlen);
    ::freeaddrinfo(res);
}

const char* phase_name(const loadgen::SharedRun& run, int64_t now) {
    const int64_t start = run.start_ns.load(std::memory_order_acquire);
    if (start == 0) return "connect";
    if (now < run.warm_end_ns()) return "warmup";
    return now < run.end_ns() ? "measure" : "done";
}

}  // namespace

// --- configuration ------------------------------------------------------------------------

void validate(const LoadConfig& cfg) {
    auto bad = [](const std::string& what) { throw std::invalid_argument(what); };
    if (cfg.host.empty()) bad("host must be a non-empty string");
    if (cfg.port == 0) bad("port must be in 1..65535");
    if (cfg.connections < 1 || cfg.connections > 1000000) {
        bad("connections must be in 1..1000000, got " + std::to_string(cfg.connections));
    }
    if (cfg.size < 1 || cfg.size > (size_t{64} << 20)) {
        bad("size must be in 1..67108864 bytes, got " + std::to_string(cfg.size));
    }
    const auto seconds = [&](double v, bool zero_ok, const char* name) {
        if (!finite_at_least(v, 0.0) || (v == 0.0 && !zero_ok) || v > kMaxLoadSeconds) {
            bad(std::string(name) + " must be a number of seconds " + (zero_ok ? ">= 0" : "> 0") +
                " and <= " + std::to_string(static_cast<long>(kMaxLoadSeconds)));
        }
    };
    seconds(cfg.duration_s, false, "duration");
    seconds(cfg.warmup_s, true, "warmup");
    if (!finite_at_least(cfg.rate, 0.0) || cfg.rate > kMaxLoadRate) {
        bad("rate must be a number of round trips/s >= 0 and <= 1e9 (0: as fast as possible)");
    }
    if (cfg.threads < 1 || cfg.threads > 256) {
        bad("threads must be in 1..256, got " + std::to_string(cfg.threads));
    }
    if (cfg.pipeline < 1 || cfg.pipeline > 1024) {
        bad("pipeline must be in 1..1024, got " + std::to_string(cfg.pipeline));
    }
    seconds(cfg.connect_timeout_s, false, "connect_timeout");
    seconds(cfg.stall_timeout_s, false, "stall_timeout");
}

const char* load_error_name(LoadError e) noexcept {
    switch (e) {
        case LoadError::ConnectFailed:
            return "connect_failed";
        case LoadError::Reset:
            return "reset";
        case LoadError::UnexpectedEof:
            return "unexpected_eof";
        case LoadError::Corrupt:
            return "corrupt";
        case LoadError::Excess:
            return "excess";
        case LoadError::Stalled:
            return "stalled";
        case LoadError::Other:
            return "other";
        case LoadError::Count:
            break;
    }
    return "?";
}

// --- histogram ----------------------------------------------------------------------------

unsigned LatencyHistogram::index(uint64_t v) noexcept {
    if (v < kSub) return static_cast<unsigned>(v);
    unsigned msb = 63;
    while ((v >> msb) == 0) --msb;
    if (msb > kMaxExp) {
        msb = kMaxExp;
        v = (uint64_t{1} << (kMaxExp + 1)) - 1;
    }
    // The kSubBits bits below the most significant one select the linear sub-bucket.
    const uint64_t sub = (v >> (msb - kSubBits)) - kSub;
    return (msb - kSubBits + 1) * kSub + static_cast<unsigned>(sub);
}

uint64_t LatencyHistogram::upper_edge(unsigned idx) noexcept {
    const unsigned group = idx / kSub;
    if (group == 0) return idx;
    const unsigned shift = group - 1;
    const uint64_t mantissa = (idx % kSub) + kSub;
    return ((mantissa + 1) << shift) - 1;
}

void LatencyHistogram::add(uint64_t ns) noexcept {
    ++counts_[index(ns)];
    ++total_;
    if (ns > max_) max_ = ns;
    sum_ += static_cast<double>(ns);
}

void LatencyHistogram::merge(const LatencyHistogram& other) {
    for (size_t i = 0; i < counts_.size(); ++i) counts_[i] += other.counts_[i];
    total_ += other.total_;
    max_ = std::max(max_, other.max_);
    sum_ += other.sum_;
}

uint64_t LatencyHistogram::quantile(double q) const noexcept {
    if (total_ == 0) return 0;
    auto rank = static_cast<uint64_t>(std::ceil(q * static_cast<double>(total_)));
    rank = std::max<uint64_t>(rank, 1);
    uint64_t seen = 0;
    for (unsigned i = 0; i < kBuckets; ++i) {
        seen += counts_[i];
        if (seen >= rank) return std::min(upper_edge(i), max_);
    }
    return max_;
}

namespace loadgen {

int64_t now_ns() noexcept {
    using namespace std::chrono;
    return duration_cast<nanoseconds>(steady_clock::now().time_since_epoch()).count();
}

// --- payload ------------------------------------------------------------------------------

Payload::Payload(uint64_t seed, size_t size) : seed_(seed) {
    // Enough distinct offsets that two messages in flight practically never share content.
    span_ = size_t{4} << 20;
    bytes_.resize(span_ + size + 8);
    uint64_t state = seed;
    for (size_t i = 0; i + 8 <= bytes_.size(); i += 8) {
        const uint64_t r = mix64(state++);
        std::memcpy(bytes_.data() + i, &r, 8);
    }
}

size_t Payload::offset(uint32_t conn, uint64_t msg) const noexcept {
    return static_cast<size_t>(mix64(seed_ ^ mix64((uint64_t{conn} << 40) ^ msg)) % span_);
}

int64_t SharedRun::warm_end_ns() const {
    return start_ns.load(std::memory_order_acquire) + static_cast<int64_t>(cfg->warmup_s * 1e9);
}

int64_t SharedRun::end_ns() const {
    return warm_end_ns() + static_cast<int64_t>(cfg->duration_s * 1e9);
}

}  // namespace loadgen

// --- the coordinator ----------------------------------------------------------------------

namespace {

struct Threads {
    std::vector<std::vector<uint32_t>> ids;
    std::unique_ptr<loadgen::RunnerCounters[]> counters;
    std::vector<loadgen::RunnerResult> results;
    std::vector<std::thread> threads;
    size_t size() const { return ids.size(); }

    bool all(std::atomic<bool> loadgen::RunnerCounters::* flag) const {
        for (size_t i = 0; i < size(); ++i) {
            if (!(counters[i].*flag).load(std::memory_order_acquire)) return false;
        }
        return true;
    }
    LoadProgress sample(const loadgen::SharedRun& run, int64_t begin, int64_t now) const {
        LoadProgress p;
        p.phase = phase_name(run, now);
        p.elapsed_s = static_cast<double>(now - begin) * 1e-9;
        for (size_t i = 0; i < size(); ++i) {
            p.round_trips += counters[i].window_round_trips.load(std::memory_order_relaxed);
            p.errors += counters[i].errors.load(std::memory_order_relaxed);
            p.open_connections += counters[i].open.load(std::memory_order_relaxed);
        }
        return p;
    }
    uint64_t all_round_trips() const {
        uint64_t n = 0;
        for (size_t i = 0; i < size(); ++i) {
            n += counters[i].all_round_trips.load(std::memory_order_relaxed);
        }
        return n;
    }
};

// Connections are dealt round-robin (thread t gets ids t, t + T, ...), so the rate schedule of
// every thread stays in time order.
Threads make_threads(const LoadConfig& cfg) {
    Threads t;
    const int n = std::min(cfg.threads, cfg.connections);
    t.ids.resize(static_cast<size_t>(n));
    for (int gid = 0; gid < cfg.connections; ++gid) {
        t.ids[static_cast<size_t>(gid % n)].push_back(static_cast<uint32_t>(gid));
    }
    t.counters.reset(new loadgen::RunnerCounters[static_cast<size_t>(n)]);
    t.results.resize(static_cast<size_t>(n));
    return t;
}

// Watches the clock on the calling thread: starts the load once every runner is ready, and
// reports progress about once per second until every runner has finished.
void coordinate(loadgen::SharedRun& run, Threads& t, int64_t begin,
                const LoadProgressFn& progress) {
    int64_t next_report = begin + kProgressNs;
    uint64_t last_rt = 0;
    int64_t last_t = begin;
    while (!t.all(&loadgen::RunnerCounters::finished)) {
        std::this_thread::sleep_for(kCoordinatorTick);
        const int64_t now = loadgen::now_ns();
        if (run.start_ns.load(std::memory_order_relaxed) == 0 &&
            t.all(&loadgen::RunnerCounters::ready)) {
            run.start_ns.store(now, std::memory_order_release);
        }
        if (progress && now >= next_report) {
            LoadProgress p = t.sample(run, begin, now);
            const uint64_t rt = t.all_round_trips();
            p.recent_per_s = static_cast<double>(rt - last_rt) * 1e9 /
                             static_cast<double>(std::max<int64_t>(now - last_t, 1));
            last_rt = rt;
            last_t = now;
            next_report = now + kProgressNs;
            if (!progress(p)) run.abort.store(true, std::memory_order_relaxed);
        }
    }
}

LoadResult merge(const LoadConfig& cfg, const loadgen::SharedRun& run, Threads& t, int64_t begin,
                 int64_t stopped) {
    LoadResult r;
    LatencyHistogram hist;
    for (size_t i = 0; i < t.size(); ++i) {
        const loadgen::RunnerResult& rr = t.results[i];
        hist.merge(rr.hist);
        for (size_t k = 0; k < rr.errors.size(); ++k) r.error_counts[k] += rr.errors[k];
        if (r.first_error.empty()) r.first_error = rr.first_error;
        r.connections_open += rr.primed;
        r.client_cpu_s += rr.window_cpu_s;
    }
    const int64_t start = run.start_ns.load(std::memory_order_acquire);
    if (start != 0) {
        r.connect_s = static_cast<double>(start - begin) * 1e-9;
        const int64_t window_end = std::min(stopped, run.end_ns());
        r.window_s =
            std::max<double>(0.0, static_cast<double>(window_end - run.warm_end_ns()) * 1e-9);
    } else {
        r.connect_s = static_cast<double>(stopped - begin) * 1e-9;
    }
    r.round_trips = hist.count();
    // A server that answered the priming echo and then nothing at all has stalled, even when
    // the window was shorter than the stall timeout.
    // At a fixed rate, so has one that answered none of the (two or more) messages the schedule
    // offered it in the window.
    const bool offered = cfg.rate == 0 || cfg.rate * r.window_s >= 2.0;
    if (offered && r.round_trips == 0 && r.connections_open > 0 && r.window_s > 0 &&
        !run.abort.load(std::memory_order_relaxed)) {
        ++r.error_counts[static_cast<size_t>(LoadError::Stalled)];
        if (r.first_error.empty()) r.first_error = "stalled: no round trip in the window";
    }
    for (uint64_t e : r.error_counts) r.errors += e;
    if (r.window_s > 0) {
        r.requests_per_s = static_cast<double>(r.round_trips) / r.window_s;
        r.mb_per_s = r.requests_per_s * static_cast<double>(cfg.size) / 1e6;
    }
    auto us = [](uint64_t ns) { return static_cast<double>(ns) / 1000.0; };
    r.p50_us = us(hist.quantile(0.50));
    r.p90_us = us(hist.quantile(0.90));
    r.p99_us = us(hist.quantile(0.99));
    r.p999_us = us(hist.quantile(0.999));
    r.max_us = us(hist.max());
    r.mean_us = hist.mean() / 1000.0;
    r.rate_target = cfg.rate;
    return r;
}

}  // namespace

LoadResult run_load(const LoadConfig& cfg, const LoadProgressFn& progress) {
    validate(cfg);
    net::ensure_initialized();
    raise_nofile(cfg.connections);
    loadgen::SharedRun run;
    run.cfg = &cfg;
    resolve(cfg, run);
    const loadgen::Payload payload(cfg.seed, cfg.size);
    run.payload = &payload;

    Threads t = make_threads(cfg);
    const int64_t begin = loadgen::now_ns();
    run.connect_deadline_ns = begin + static_cast<int64_t>(cfg.connect_timeout_s * 1e9);
    for (size_t i = 0; i < t.size(); ++i) {
        try {
            t.threads.emplace_back(loadgen::run_runner, std::ref(run), std::cref(t.ids[i]),
                                   std::ref(t.counters[i]), std::ref(t.results[i]));
        } catch (const std::system_error& e) {
            // Fewer threads than asked: stop the ones running, then report.
            run.abort.store(true, std::memory_order_relaxed);
            for (std::thread& th : t.threads) th.join();
            throw SystemError(e.code().value(), std::string("starting a load thread: ") + e.what());
        }
    }
    coordinate(run, t, begin, progress);
    const int64_t stopped = loadgen::now_ns();
    for (std::thread& th : t.threads) th.join();
    for (const loadgen::RunnerResult& rr : t.results) {
        if (rr.fatal_errno != 0) throw SystemError(rr.fatal_errno, "load generator: " + rr.fatal);
        if (!rr.fatal.empty()) throw std::runtime_error("load generator: " + rr.fatal);
    }
    return merge(cfg, run, t, begin, stopped);
}

}  // namespace iocpnative
