// Registration point for areas that arrive later (crash dumps, load generator). Each adds one
// line here and its own file beside this one.
#include "bindings.hpp"

namespace iocpnative {
namespace bindings {

void register_extras(py::module_& m) {
    register_crash(m);
    register_bench(m);
    register_handler(m);
}

}  // namespace bindings
}  // namespace iocpnative
