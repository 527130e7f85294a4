// trigger_test_crash(): the same deliberate fault on every platform, so a user can check that a
// crash in native code leaves a report (SIGSEGV on POSIX, EXCEPTION_ACCESS_VIOLATION on Windows).
#include <cstdlib>

#include "iocpnative/crash_dump.hpp"

namespace iocpnative {

void trigger_test_crash() {
    // A write through a null pointer the compiler cannot see is null (it is read through a
    // volatile), so it emits a real store instead of a trap or nothing at all.
    int* volatile target = nullptr;
    *target = 0x1dead;
    // Reached only if something handled the fault and resumed: still never return.
    std::abort();
}

}  // namespace iocpnative
