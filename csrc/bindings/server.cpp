#include "bindings.hpp"
#include "iocpnative/server.hpp"

#include <pybind11/stl.h>

namespace iocpnative {
namespace bindings {

namespace {

py::dict stats_dict(const ServerStats& s) {
    py::dict d;
    d["active_connections"] = s.active_connections;
    d["total_connections"] = s.total_connections;
    d["rejected_connections"] = s.rejected_connections;
    d["bytes_received"] = s.bytes_received;
    d["bytes_sent"] = s.bytes_sent;
    d["pool_in_use"] = s.pool_in_use;
    d["pool_allocated"] = s.pool_allocated;
    d["handler_errors"] = s.handler_errors;
    d["recv_buffers"] = s.recv_buffers;
    return d;
}

// Destroying a Server stops it and waits for its workers, which may be waiting for the GIL to
// call a Python handler: pybind11 deallocates with the GIL held, so give it up meanwhile.
struct ReleaseGilDelete {
    void operator()(Server* s) const {
        py::gil_scoped_release nogil;
        delete s;
    }
};
using ServerHolder = std::unique_ptr<Server, ReleaseGilDelete>;

}  // namespace

void register_server(py::module_& m) {
    m.attr("DEFAULT_BATCH_WAIT_US") = kDefaultBatchWaitUs;
    py::class_<Server, ServerHolder>(m, "Server")
        .def(py::init([](const std::string& host, int port, int workers, const std::string& backend,
                         size_t buffer_size, size_t max_connections, double idle_timeout,
                         bool verbose, const py::object& handler, int batch_wait_us) {
                 if (port < 0 || port > 65535) {
                     throw std::invalid_argument("port must be in 0..65535, got " +
                                                 std::to_string(port));
                 }
                 ServerConfig cfg;
                 cfg.host = host;
                 cfg.port = static_cast<uint16_t>(port);
                 cfg.workers = workers;
                 cfg.backend = backend;
                 cfg.buffer_size = buffer_size;
                 cfg.max_connections = max_connections;
                 cfg.idle_timeout = idle_timeout;
                 cfg.verbose = verbose;
                 cfg.batch_wait_us = batch_wait_us;
                 validate(cfg);
                 return ServerHolder(new Server(cfg, as_data_handler(handler)));
             }),
             py::arg("host"), py::arg("port"), py::arg("workers"), py::arg("backend"),
             py::arg("buffer_size"), py::arg("max_connections"), py::arg("idle_timeout"),
             py::arg("verbose"), py::arg("handler") = py::none(),
             py::arg("batch_wait_us") = kDefaultBatchWaitUs)
        .def("start", &Server::start, py::call_guard<py::gil_scoped_release>())
        .def("stop", &Server::stop, py::arg("timeout"), py::call_guard<py::gil_scoped_release>())
        .def("stats", [](const Server& s) { return stats_dict(s.stats()); })
        .def_property_readonly("running", &Server::running)
        .def_property_readonly("port", &Server::port)
        .def_property_readonly("host", &Server::host)
        .def_property_readonly("backend", &Server::backend)
        .def_property_readonly("workers", &Server::workers);
}

}  // namespace bindings
}  // namespace iocpnative
