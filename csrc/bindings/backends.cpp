#include "backend/backend.hpp"
#include "bindings.hpp"

#include <pybind11/stl.h>

namespace iocpnative {
namespace bindings {

void register_backends(py::module_& m) {
    m.def("available_backends", &available_backends, "Backends usable here and now, best first.");
    m.def(
        "backend_statuses",
        [] {
            py::list out;
            for (const auto& st : backend_statuses()) {
                py::dict d;
                d["name"] = st.name;
                d["compiled"] = st.compiled;
                d["available"] = st.available;
                d["reason"] = st.reason;
                out.append(d);
            }
            return out;
        },
        "Every backend this platform knows: name, compiled, available, reason.");
    m.def("resolve_backend", &resolve_backend, py::arg("requested"),
          "The backend 'auto' (or the given name) resolves to; ValueError if unusable.");
}

}  // namespace bindings
}  // namespace iocpnative
