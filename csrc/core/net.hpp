// Thin, portable socket helpers (POSIX sockets and Winsock) used by the core, client and tools.
#pragma once

#include <cstdint>
#include <string>

#include "iocpnative/platform.hpp"

namespace iocpnative {
namespace net {

// Winsock needs WSAStartup before any socket call; a no-op elsewhere. Idempotent, thread-safe.
void ensure_initialized();

struct Listener {
    socket_t sock = kInvalidSocket;
    uint16_t port = 0;
};

// Resolves host (numeric IPv4/IPv6 or a name), binds, listens; non-blocking. A port in use
// fails with EADDRINUSE: SO_REUSEADDR on POSIX (which never lets two listeners share a port),
// SO_EXCLUSIVEADDRUSE on Windows. Throws SystemError / std::invalid_argument (unresolvable).
Listener listen_tcp(const std::string& host, uint16_t port, int backlog);

// A new socket that no child process inherits, overlapped on Windows (as socket() makes them,
// and as IOCP needs). Every socket of the server and the client comes from here, so that a
// process started meanwhile (subprocess, CreateProcess with inheritance) cannot keep a listener
// bound or a connection open after we closed ours. kInvalidSocket on failure
// (last_socket_error() says why).
socket_t open_socket(int family, int type, int protocol) noexcept;
void close_socket(socket_t s) noexcept;
// Returns 0 or an errno value.
int set_nonblocking(socket_t s, bool on) noexcept;
void set_nodelay(socket_t s) noexcept;
// "ip:port" (IPv6 as "[ip]:port") of the peer, or "?" when unknown.
std::string peer_name(socket_t s);

}  // namespace net
}  // namespace iocpnative
