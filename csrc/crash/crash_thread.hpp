// Per-thread preparation for crash capture, called by the threads the core creates.
//
// A fatal signal (POSIX) or an unhandled exception (Windows) is handled on the thread that
// faulted. After a stack overflow that thread has no stack left to run a handler on, so each
// thread needs its own reserve: on POSIX an alternate signal stack (sigaltstack is per thread,
// and the kernel switches to it only for handlers installed with SA_ONSTACK); on Windows a stack
// guarantee (SetThreadStackGuarantee) so the exception filter still has room to run.
#pragma once

namespace iocpnative {
namespace crash {

// Gives the calling thread its reserve unless it already has one (Python's faulthandler, for
// example, installs an alternate stack on the thread that enables it). The reserve is released
// when the thread exits. Never throws: a thread without a reserve still reports every crash
// except a stack overflow, so a failure here is not worth failing the thread for.
void prepare_thread() noexcept;

}  // namespace crash
}  // namespace iocpnative
