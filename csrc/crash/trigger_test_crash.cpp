// trigger_test_crash(): the same deliberate fault on every platform, so a user can check that a
// crash in native code leaves a report (SIGSEGV on POSIX, EXCEPTION_ACCESS_VIOLATION on Windows).
#include <cstdlib>

#include "iocpnative/crash_dump.hpp"

// UBSan would report the null store as undefined behaviour and exit before the fault happens;
// the fault is the point here, so that one check is off for this function.
#if defined(__GNUC__) || defined(__clang__)
#define IOCPNATIVE_NO_SANITIZE_NULL __attribute__((no_sanitize("null")))
#else
#define IOCPNATIVE_NO_SANITIZE_NULL
#endif  // defined(__GNUC__) || defined(__clang__)

namespace iocpnative {

IOCPNATIVE_NO_SANITIZE_NULL void trigger_test_crash() {
    // A write through a null pointer. Both volatiles are needed: the pointer's, so the compiler
    // cannot see it is null (and emit a trap instruction instead); the target's, so the store is
    // not dropped as dead (nothing reads it before abort(), which GCC -O1 and up exploit).
    volatile int* volatile target = nullptr;
    *target = 0x1dead;
    // Reached only if something handled the fault and resumed: still never return.
    std::abort();
}

}  // namespace iocpnative
