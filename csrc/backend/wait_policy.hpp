// A Linux worker's two adaptive ways of waiting, each switched on or off once per span (at least
// kSpanUs) from what the span before showed:
// - BatchPolicy: batch waits (io_uring: the kernel's min_wait, see uring_backend.cpp; epoll: a
//   sleep no arriving data ends, see epoll_backend.cpp). Each arms a kernel timer and holds the
//   requests that arrive in its window, so it pays only where the window gathers a few of them.
// - SpinPolicy (io_uring): polling for up to kSpinUs before sleeping. Under saturation the next
//   completion is due within microseconds, and the sleep and wake-up cost more than the poll (on
//   loopback the peer's CPU pays our wake-up too; in a virtual machine a sleeping CPU also has to
//   be scheduled again by the host).
// Plain counters, no clock and no ring: the poller feeds them, the tests drive them span by span.
#pragma once

#include <algorithm>
#include <cstdint>

namespace iocpnative {
namespace waits {

constexpr int64_t kSpanUs = 5000;
constexpr int64_t kBackoffMaxSpans = 32;
constexpr int64_t kSpinUs = 20;

// After a span in which a strategy was used and did not pay, it stays off for 2, 4, ...
// kBackoffMaxSpans spans; a span in which it paid starts the doubling over.
class Backoff {
  public:
    void paid() noexcept { next_ = 1; }
    void failed() noexcept {
        next_ = std::min(next_ * 2, kBackoffMaxSpans);
        skip_ = next_;
    }
    // A span went by without the strategy.
    void skipped() noexcept {
        if (skip_ > 0) --skip_;
    }
    bool holding() const noexcept { return skip_ > 0; }

  private:
    int64_t next_ = 1;
    int64_t skip_ = 0;
};

// On while the arrival rate brings at least 1.25 requests per window and the batch waits of the
// span (if any) gathered that many on average. The second test catches requests that cannot come
// together, such as one busy client among idle connections, whose next request waits for this
// reply. Measured with peers.py at 5,000 round trips/s on 100 connections (one arrival per 200 us
// window): batch waits cost 1.08-1.22x the C epoll peer's CPU per message and +110 us p50; at
// 7,500/s (1.5 per window) they save 13 %, at 10,000/s (2) 39 %. With the 500 us default window
// (later, on a VM whose wake-ups cost more) 2,500/s (1.25 per window) measured 0.91x the C epoll
// peer's CPU per message and 5,000/s (2.5) 0.60x.
class BatchPolicy {
  public:
    void arrival() noexcept { ++arrivals_; }
    int64_t arrivals() const noexcept { return arrivals_; }  // so far in this span
    void batch_wait(int64_t gathered) noexcept {
        ++waits_;
        gathered_ += gathered;
    }
    // Ends a span of `span_us` with batch window `window_us`; returns on().
    bool end_span(int64_t span_us, int64_t window_us) noexcept {
        const bool rate_ok = arrivals_ * window_us * kMinDen >= kMinNum * span_us;
        if (waits_ == 0) {
            backoff_.skipped();
        } else if (gathered_ * kMinDen >= kMinNum * waits_) {
            backoff_.paid();
        } else {
            backoff_.failed();
        }
        on_ = rate_ok && !backoff_.holding();
        arrivals_ = waits_ = gathered_ = 0;
        return on_;
    }
    bool on() const noexcept { return on_; }

  private:
    static constexpr int64_t kMinNum = 5;  // 1.25 arrivals per window
    static constexpr int64_t kMinDen = 4;
    int64_t arrivals_ = 0;  // recvs that brought data in this span
    int64_t waits_ = 0;     // batch waits in this span
    int64_t gathered_ = 0;  // arrivals they gathered
    Backoff backoff_;
    bool on_ = false;
};

// Off, it turns on when at least half of the span's blocking waits (kMinWaits or more) ended
// within kSpinUs, sleep and wake-up included, or when the worker slept less than a fifth of the
// span (busy 80 % of the time or more: saturated, whatever kind of wait it used, batch waits
// included). On, it stays on while at least 9 in 10 polls found a completion; when it turns off,
// Backoff keeps it off for a while.
class SpinPolicy {
  public:
    // A blocking wait (off) or a poll (on) ended, within kSpinUs or not.
    void waited(bool within) noexcept { ++(within ? short_ : long_); }
    // Time spent asleep in a blocking wait of any kind.
    void slept(int64_t us) noexcept { slept_us_ += us; }
    // Ends a span of `span_us`; returns on().
    bool end_span(int64_t span_us) noexcept {
        const int64_t n = short_ + long_;
        if (on_) {
            on_ = n > 0 && short_ * 10 >= 9 * n;
            if (on_) {
                backoff_.paid();
            } else {
                backoff_.failed();
            }
        } else if (backoff_.holding()) {
            backoff_.skipped();
        } else {
            const bool short_waits = n >= kMinWaits && short_ * 2 >= n;
            const bool busy = slept_us_ * kBusyShare < span_us;
            on_ = short_waits || busy;
        }
        short_ = long_ = slept_us_ = 0;
        return on_;
    }
    bool on() const noexcept { return on_; }

  private:
    static constexpr int64_t kMinWaits = 20;
    static constexpr int64_t kBusyShare = 5;  // busy: asleep less than 1/kBusyShare of the span
    int64_t short_ = 0;
    int64_t long_ = 0;
    int64_t slept_us_ = 0;
    Backoff backoff_;
    bool on_ = false;
};

}  // namespace waits
}  // namespace iocpnative
