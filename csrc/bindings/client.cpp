#include "bindings.hpp"
#include "iocpnative/client.hpp"

namespace iocpnative {
namespace bindings {

namespace {

// A contiguous read-only view of any bytes-like object, held while the GIL is released.
// PyBUF_SIMPLE asks for a C-contiguous buffer: a strided 1-D view (memoryview(b)[::2]) raises
// BufferError, as socket.send() does, instead of sending the wrong bytes; an object without the
// buffer protocol (str) raises TypeError. No copy and no allocation (py::buffer_info would
// allocate its shape and strides on every call).
class Bytes {
  public:
    explicit Bytes(const py::handle& obj) {
        if (PyObject_GetBuffer(obj.ptr(), &view_, PyBUF_SIMPLE) != 0) throw py::error_already_set();
    }
    ~Bytes() { PyBuffer_Release(&view_); }
    Bytes(const Bytes&) = delete;
    Bytes& operator=(const Bytes&) = delete;
    const char* data() const { return static_cast<const char*>(view_.buf); }
    size_t size() const { return static_cast<size_t>(view_.len); }

  private:
    Py_buffer view_{};
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
             [](Client& c, const py::handle& data) {
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
             [](Client& c, const py::handle& data) {
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
