#include "bindings.hpp"
#include "iocpnative/client.hpp"

namespace iocpnative {
namespace bindings {

namespace {

// A contiguous read-only view of any bytes-like object, held while the GIL is released.
struct Bytes {
    explicit Bytes(const py::buffer& b) : info(b.request()) {
        // A strided 1-D view (memoryview(b)[::2]) is not contiguous either: sending size()
        // bytes from ptr would send the wrong bytes. BufferError, as socket.send() raises.
        if (!PyBuffer_IsContiguous(info.view(), 'C')) {
            throw py::buffer_error("data must be a C-contiguous bytes-like object");
        }
    }
    const char* data() const { return static_cast<const char*>(info.ptr); }
    size_t size() const { return static_cast<size_t>(info.size * info.itemsize); }
    py::buffer_info info;
};

py::bytes new_bytes(size_t n) {
    PyObject* o = PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(n));
    if (o == nullptr) throw py::error_already_set();
    return py::reinterpret_steal<py::bytes>(o);
}

py::bytes shrink(py::bytes b, size_t n) {
    PyObject* o = b.release().ptr();
    if (_PyBytes_Resize(&o, static_cast<Py_ssize_t>(n)) != 0) throw py::error_already_set();
    return py::reinterpret_steal<py::bytes>(o);
}

}  // namespace

void register_client(py::module_& m) {
    py::class_<Client>(m, "Client")
        .def(py::init<const std::string&, uint16_t, double>(), py::arg("host"), py::arg("port"),
             py::arg("timeout"), py::call_guard<py::gil_scoped_release>())
        .def("send",
             [](Client& c, const py::buffer& data) {
                 Bytes b(data);
                 py::gil_scoped_release nogil;
                 return c.send(b.data(), b.size());
             })
        .def(
            "recv",
            [](Client& c, size_t max_bytes) {
                py::bytes out = new_bytes(max_bytes);
                char* p = PyBytes_AS_STRING(out.ptr());
                size_t n;
                {
                    py::gil_scoped_release nogil;
                    n = c.recv(p, max_bytes);
                }
                return n == max_bytes ? out : shrink(std::move(out), n);
            },
            py::arg("max_bytes"))
        .def("request",
             [](Client& c, const py::buffer& data) {
                 Bytes b(data);
                 py::bytes out = new_bytes(b.size());
                 char* p = PyBytes_AS_STRING(out.ptr());
                 {
                     py::gil_scoped_release nogil;
                     c.request(b.data(), b.size(), p);
                 }
                 return out;
             })
        .def("shutdown_write", &Client::shutdown_write)
        .def("close", &Client::close)
        .def_property_readonly("closed", &Client::closed)
        .def_property("timeout", &Client::timeout, &Client::set_timeout);
}

}  // namespace bindings
}  // namespace iocpnative
