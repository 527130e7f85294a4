// Entry points of the backends compiled into this build. CMake defines IOCPNATIVE_HAVE_<NAME>
// for each backend whose sources it adds.
#pragma once

#include <memory>
#include <string>

#include "backend.hpp"

namespace iocpnative {

#ifdef IOCPNATIVE_HAVE_IOCP
std::unique_ptr<Backend> make_iocp_backend();
// Returns "" when usable, else why not.
std::string probe_iocp();
#endif  // IOCPNATIVE_HAVE_IOCP

#ifdef IOCPNATIVE_HAVE_URING
std::unique_ptr<Backend> make_uring_backend();
std::string probe_uring();
#endif  // IOCPNATIVE_HAVE_URING

#ifdef IOCPNATIVE_HAVE_EPOLL
std::unique_ptr<Backend> make_epoll_backend();
std::string probe_epoll();
#endif  // IOCPNATIVE_HAVE_EPOLL

}  // namespace iocpnative
