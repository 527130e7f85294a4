// iocpnative._native: conversions, the GIL and exception mapping only. Each area registers
// itself from its own file (boost-histogram's src/module.cpp pattern).
#include "bindings.hpp"

PYBIND11_MODULE(_native, m) {
    m.doc() = "Native core of iocpnative: completion-port echo server and client.";
    m.attr("__version__") = IOCPNATIVE_VERSION;
    iocpnative::bindings::register_errors(m);
    iocpnative::bindings::register_backends(m);
    iocpnative::bindings::register_server(m);
    iocpnative::bindings::register_client(m);
    iocpnative::bindings::register_extras(m);
}
