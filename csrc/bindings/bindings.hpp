#pragma once

#include <pybind11/pybind11.h>

#include <memory>

#include "iocpnative/server.hpp"

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

// Python handlers (handler.cpp): the _native.Handler class, and the DataHandler an instance of it
// (or None -> nullptr) gives the server.
void register_handler(py::module_& m);
std::shared_ptr<DataHandler> as_data_handler(const py::handle& h);

}  // namespace bindings
}  // namespace iocpnative
