// Portable socket vocabulary shared by the core, the backends, the client and the tools.
//
// Windows headers are included lower-case (winsock2.h, not WinSock2.h): MinGW cross-compilers
// run on case-sensitive file systems, and the seed's `#include <WinSock2.h>` fails there.
#pragma once

#include <cstddef>
#include <cstdint>

#ifdef _WIN32
#ifndef WIN32_LEAN_AND_MEAN
#define WIN32_LEAN_AND_MEAN
#endif
#ifndef NOMINMAX
#define NOMINMAX
#endif
#include <winsock2.h>
#include <ws2tcpip.h>
#include <windows.h>
#else
#include <sys/socket.h>
#endif  // _WIN32

namespace iocpnative {

// kSendFlags: what every send() passes (POSIX: no SIGPIPE from a peer that closed; Winsock
// raises no signal). io_len_t: the length type of send()/recv().
#ifdef _WIN32
using socket_t = SOCKET;
constexpr socket_t kInvalidSocket = INVALID_SOCKET;
constexpr int kSendFlags = 0;
using io_len_t = int;
#else
using socket_t = int;
constexpr socket_t kInvalidSocket = -1;
constexpr int kSendFlags = MSG_NOSIGNAL;
using io_len_t = size_t;
#endif  // _WIN32

}  // namespace iocpnative
