#include "net.hpp"

#include <cerrno>
#include <cstring>
#include <mutex>
#include <stdexcept>

#include "iocpnative/errors.hpp"

#ifdef _WIN32
#include <mswsock.h>
// Windows 7 SP1 and later (the flag is refused with WSAEINVAL before); defined here in case an
// older MinGW-w64 header lacks it.
#ifndef WSA_FLAG_NO_HANDLE_INHERIT
#define WSA_FLAG_NO_HANDLE_INHERIT 0x80
#endif  // WSA_FLAG_NO_HANDLE_INHERIT
#else
#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <unistd.h>
#endif  // _WIN32

namespace iocpnative {

SystemError make_system_error(int err, const std::string& context) {
    return SystemError(err, context + ": " + std::strerror(err));
}

int errno_from_native(int native) noexcept {
#ifdef _WIN32
    switch (native) {
        case WSAEADDRINUSE:
            return EADDRINUSE;
        case WSAEADDRNOTAVAIL:
            return EADDRNOTAVAIL;
        case WSAECONNREFUSED:
            return ECONNREFUSED;
        case WSAECONNRESET:
            return ECONNRESET;
        case WSAECONNABORTED:
            return ECONNABORTED;
        case WSAETIMEDOUT:
            return ETIMEDOUT;
        case WSAEWOULDBLOCK:
            return EWOULDBLOCK;
        case WSAEINPROGRESS:
            return EINPROGRESS;
        case WSAEALREADY:
            return EALREADY;
        case WSAEINVAL:
            return EINVAL;
        case WSAEACCES:
            return EACCES;
        case WSAEMFILE:
            return EMFILE;
        case WSAENOBUFS:
            return ENOBUFS;
        case WSAENOTCONN:
            return ENOTCONN;
        case WSAESHUTDOWN:
            return EPIPE;
        case WSAENETUNREACH:
            return ENETUNREACH;
        case WSAEHOSTUNREACH:
            return EHOSTUNREACH;
        case WSAENOTSOCK:
            return ENOTSOCK;
        case WSAEAFNOSUPPORT:
            return EAFNOSUPPORT;
        case WSAEINTR:
            return EINTR;
        // WSA_OPERATION_ABORTED is ERROR_OPERATION_ABORTED (995): one case serves both.
        case WSA_OPERATION_ABORTED:
            return ECANCELED;
        case WSAENETRESET:
            return ECONNRESET;
        case ERROR_NOT_ENOUGH_MEMORY:
            return ENOMEM;
        // What an AcceptEx completion reports under wine when no descriptor is left (WSASocketW
        // reports WSAEMFILE for the same).
        case ERROR_TOO_MANY_OPEN_FILES:
            return EMFILE;
        case ERROR_NETNAME_DELETED:
            return ECONNRESET;
        case ERROR_CONNECTION_REFUSED:
            return ECONNREFUSED;
        case ERROR_CONNECTION_ABORTED:
            return ECONNABORTED;
        case WAIT_TIMEOUT:
            return ETIMEDOUT;
        default:
            return native == 0 ? 0 : EIO;
    }
#else
    return native;
#endif  // _WIN32
}

int last_socket_error() noexcept {
#ifdef _WIN32
    return errno_from_native(WSAGetLastError());
#else
    return errno;
#endif  // _WIN32
}

namespace net {

void ensure_initialized() {
#ifdef _WIN32
    static std::once_flag once;
    std::call_once(once, [] {
        WSADATA data;
        const int rc = WSAStartup(MAKEWORD(2, 2), &data);
        if (rc != 0) throw make_system_error(errno_from_native(rc), "WSAStartup");
    });
#endif  // _WIN32
}

// Non-inheritable from the start, not marked afterwards (SetHandleInformation, fcntl): a process
// started by another thread between the two calls would still get the socket.
socket_t open_socket(int family, int type, int protocol) noexcept {
#ifdef _WIN32
    return ::WSASocketW(family, type, protocol, nullptr, 0,
                        WSA_FLAG_OVERLAPPED | WSA_FLAG_NO_HANDLE_INHERIT);
#else
    return ::socket(family, type | SOCK_CLOEXEC, protocol);  // Linux >= 2.6.27
#endif  // _WIN32
}

void close_socket(socket_t s) noexcept {
    if (s == kInvalidSocket) return;
#ifdef _WIN32
    ::closesocket(s);
#else
    ::close(s);
#endif  // _WIN32
}

int set_nonblocking(socket_t s, bool on) noexcept {
#ifdef _WIN32
    u_long mode = on ? 1 : 0;
    return ::ioctlsocket(s, FIONBIO, &mode) == 0 ? 0 : last_socket_error();
#else
    const int flags = ::fcntl(s, F_GETFL, 0);
    if (flags < 0) return errno;
    const int want = on ? (flags | O_NONBLOCK) : (flags & ~O_NONBLOCK);
    return ::fcntl(s, F_SETFL, want) == 0 ? 0 : errno;
#endif  // _WIN32
}

void set_nodelay(socket_t s) noexcept {
    int one = 1;
    // Failure only costs latency (e.g. on a non-TCP socket in a test): ignored on purpose.
    (void)::setsockopt(s, IPPROTO_TCP, TCP_NODELAY, reinterpret_cast<const char*>(&one),
                       sizeof(one));
}

std::string peer_name(socket_t s) {
    sockaddr_storage ss{};
    socklen_t len = sizeof(ss);
    if (::getpeername(s, reinterpret_cast<sockaddr*>(&ss), &len) != 0) return "?";
    char host[INET6_ADDRSTRLEN] = "?";
    unsigned port = 0;
    if (ss.ss_family == AF_INET) {
        auto* a = reinterpret_cast<sockaddr_in*>(&ss);
        ::inet_ntop(AF_INET, &a->sin_addr, host, sizeof(host));
        port = ntohs(a->sin_port);
        return std::string(host) + ":" + std::to_string(port);
    }
    if (ss.ss_family == AF_INET6) {
        auto* a = reinterpret_cast<sockaddr_in6*>(&ss);
        ::inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof(host));
        port = ntohs(a->sin6_port);
        return "[" + std::string(host) + "]:" + std::to_string(port);
    }
    return "?";
}

Listener listen_tcp(const std::string& host, uint16_t port, int backlog) {
    ensure_initialized();
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_protocol = IPPROTO_TCP;
    hints.ai_flags = AI_PASSIVE;
    addrinfo* res = nullptr;
    const std::string service = std::to_string(port);
    const int gai =
        ::getaddrinfo(host.empty() ? nullptr : host.c_str(), service.c_str(), &hints, &res);
    if (gai != 0 || res == nullptr) {
        throw std::invalid_argument("host '" + host + "' does not resolve to a local address: " +
                                    std::string(gai_strerror(gai)));
    }
    int err = 0;
    std::string step = "socket";
    Listener out;
    for (addrinfo* ai = res; ai != nullptr; ai = ai->ai_next) {
        socket_t s = open_socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
        if (s == kInvalidSocket) {
            err = last_socket_error();
            step = "socket";
            continue;
        }
        int one = 1;
#ifdef _WIN32
        ::setsockopt(s, SOL_SOCKET, SO_EXCLUSIVEADDRUSE, reinterpret_cast<const char*>(&one),
                     sizeof(one));
#else
        ::setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
#endif  // _WIN32
        if (::bind(s, ai->ai_addr, static_cast<socklen_t>(ai->ai_addrlen)) != 0) {
            err = last_socket_error();
            step = "bind to " + host + ":" + service;
            close_socket(s);
            continue;
        }
        if (::listen(s, backlog) != 0) {
            err = last_socket_error();
            step = "listen";
            close_socket(s);
            continue;
        }
        if ((err = set_nonblocking(s, true)) != 0) {
            step = "set non-blocking";
            close_socket(s);
            continue;
        }
        sockaddr_storage bound{};
        socklen_t blen = sizeof(bound);
        if (::getsockname(s, reinterpret_cast<sockaddr*>(&bound), &blen) != 0) {
            err = last_socket_error();
            step = "getsockname";
            close_socket(s);
            continue;
        }
        out.sock = s;
        out.port = bound.ss_family == AF_INET6
                       ? ntohs(reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port)
                       : ntohs(reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
        break;
    }
    ::freeaddrinfo(res);
    if (out.sock == kInvalidSocket) throw make_system_error(err ? err : EINVAL, step);
    return out;
}

}  // namespace net
}  // namespace iocpnative
