#pragma once

#include <pybind11/pybind11.h>

namespace iocpnative {
namespace bindings {

namespace py = pybind11;

void register_errors(py::module_& m);
void register_backends(py::module_& m);
void register_server(py::module_& m);
void register_client(py::module_& m);
// Areas added by later work (crash dumps, load generator) register here; see extras.cpp.
void register_extras(py::module_& m);
void register_crash(py::module_& m);  // crash.cpp
void register_bench(py::module_& m);  // bench.cpp

}  // namespace bindings
}  // namespace iocpnative
