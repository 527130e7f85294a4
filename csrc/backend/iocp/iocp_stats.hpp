// How the IOCP backend's operations completed, summed over the pollers and backends destroyed so
// far in this process. The C++ tests read it to prove that each of the cases DESIGN.md lists
// was taken (and accounted once); nothing else depends on it. Each poller counts in plain
// fields and adds them here once, when it is destroyed, so the hot path has no shared writes.
#pragma once

#include <cstdint>

namespace iocpnative {
namespace iocp {

struct CompletionPaths {
    int64_t pending = 0;              // WSA_IO_PENDING: one packet later
    int64_t inline_success = 0;       // immediate success, skip mode: queued by the worker
    int64_t success_with_packet = 0;  // immediate success, no skip mode: one packet anyway
    int64_t failed_at_once = 0;       // immediate failure (or close requested): queued locally
    int64_t packets = 0;              // connection packets dequeued
    int64_t accepts_completed = 0;    // accept packets dequeued (any status)
    int64_t accept_resets = 0;        // of those, failed because the peer reset first
    int64_t accept_pauses = 0;        // accepts parked for a pause (could not be posted)
    int64_t wakeups_forwarded = 0;    // stop() wake-ups passed on to another worker
    int64_t zero_reads = 0;           // zero-byte reads posted (a wait without a buffer)
    int64_t reads_now = 0;            // non-blocking reads that found bytes or the end
    int64_t reclaims_requested = 0;   // reads a buffer scan cancelled to take the buffer back
    int64_t buffers_reclaimed = 0;    // of those, cancelled in time (the others had completed)
};

CompletionPaths completion_paths();
// Accepts parked for a pause right now (could not be posted; posted again when it ends).
int64_t parked_accepts();
void add_completion_paths(const CompletionPaths& p);

}  // namespace iocp
}  // namespace iocpnative
