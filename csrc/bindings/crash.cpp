// Crash capture: iocpnative._native.enable_crash_dumps / disable_crash_dumps /
// crash_dump_directory / trigger_test_crash.
#include <pybind11/stl.h>

#include "bindings.hpp"
#include "iocpnative/crash_dump.hpp"

namespace iocpnative {
namespace bindings {

namespace {

// The directory as Python spells a file name (os.fsdecode: the file system encoding with
// surrogateescape on POSIX). A Linux name need not be UTF-8 (realpath may lead through a
// symlink to one), and pybind11's own std::string -> str conversion would raise for it.
py::str directory_to_python(const std::string& dir) {
    PyObject* s = PyUnicode_DecodeFSDefaultAndSize(dir.data(), static_cast<Py_ssize_t>(dir.size()));
    if (s == nullptr) throw py::error_already_set();
    return py::reinterpret_steal<py::str>(s);
}

}  // namespace

void register_crash(py::module_& m) {
    // `directory` may be bytes (os.fsencode), which is how _crash.py passes it: a str holding a
    // surrogate escape cannot be encoded as UTF-8.
    m.def("enable_crash_dumps", &enable_crash_dumps, py::arg("directory"),
          "Install the crash handler writing reports into `directory` (created if missing).");
    m.def("disable_crash_dumps", &disable_crash_dumps, "Remove the crash handler.");
    m.def(
        "crash_dump_directory", [] { return directory_to_python(crash_dump_directory()); },
        "The directory crash reports go to, or '' when disabled.");
    // The GIL stays held: Python's faulthandler, if chained, then reports this thread's Python
    // traceback as the current one.
    m.def("trigger_test_crash", &trigger_test_crash,
          "Fault on purpose in native code (a write through a null pointer). The process dies.");
}

}  // namespace bindings
}  // namespace iocpnative
