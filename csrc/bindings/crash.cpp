// Crash capture: iocpnative._native.enable_crash_dumps / disable_crash_dumps /
// crash_dump_directory / trigger_test_crash.
#include <pybind11/stl.h>

#include "bindings.hpp"
#include "iocpnative/crash_dump.hpp"

namespace iocpnative {
namespace bindings {

void register_crash(py::module_& m) {
    m.def("enable_crash_dumps", &enable_crash_dumps, py::arg("directory"),
          "Install the crash handler writing reports into `directory` (created if missing).");
    m.def("disable_crash_dumps", &disable_crash_dumps, "Remove the crash handler.");
    m.def("crash_dump_directory", &crash_dump_directory,
          "The directory crash reports go to, or '' when disabled.");
    // The GIL stays held: Python's faulthandler, if chained, then reports this thread's Python
    // traceback as the current one.
    m.def("trigger_test_crash", &trigger_test_crash,
          "Fault on purpose in native code (a write through a null pointer). The process dies.");
}

}  // namespace bindings
}  // namespace iocpnative
