// trigger_test_crash(): the same deliberate fault on every platform, so a user can check that a
// crash in native code leaves a report (SIGSEGV on POSIX, EXCEPTION_ACCESS_VIOLATION on Windows).
#include <cstdlib>

#include "iocpnative/crash_dump.hpp"

namespace iocpnative {

void trigger_test_crash() {
    // A write through a null pointer. Both volatiles are needed: the pointer's, so the compiler
    // cannot see it is null (and emit a trap instruction instead); the target's, so the store is
    // not dropped as dead (nothing reads it before abort(), which GCC -O1 and up exploit).
    volatile int* volatile target = nullptr;
    *target = 0x1dead;
    // Reached only if something handled the fault and resumed: still never return.
    std::abort();
}

}  // namespace iocpnative
