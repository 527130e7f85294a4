// Crash capture: a fatal native fault writes one report file, then the process dies as it would
// have (same signal / exception code). Windows: MiniDumpWriteDump (.dmp). POSIX: an
// async-signal-safe handler on an alternate stack (.crash text report with a backtrace).
#pragma once

#include <string>

namespace iocpnative {

// Installs (or re-targets) the handler; creates `directory` if missing. Throws SystemError when
// the directory cannot be created or is not writable.
void enable_crash_dumps(const std::string& directory);
// Removes the handler, restoring the previous one.
void disable_crash_dumps();
// The directory in use, or "" when disabled.
std::string crash_dump_directory();
// Faults on purpose in native code (a write through a null pointer), to check a set-up.
[[noreturn]] void trigger_test_crash();

}  // namespace iocpnative
