// C++ exceptions -> Python exceptions. SystemError becomes OSError(errno, message), which Python
// itself turns into the matching subclass (ConnectionRefusedError for ECONNREFUSED, ...).
#include "bindings.hpp"
#include "iocpnative/errors.hpp"

namespace iocpnative {
namespace bindings {

void register_errors(py::module_& /*m*/) {
    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const SystemError& e) {
            py::object err = py::reinterpret_steal<py::object>(
                PyObject_CallFunction(PyExc_OSError, "is", e.code(), e.what()));
            if (err) PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(err.ptr())), err.ptr());
        } catch (const TimeoutError& e) {
            PyErr_SetString(PyExc_TimeoutError, e.what());
        }
    });
}

}  // namespace bindings
}  // namespace iocpnative
