// Portable socket vocabulary shared by the core, the backends, the client and the tools.
//
// Windows headers are included lower-case (winsock2.h, not WinSock2.h): MinGW cross-compilers
// run on case-sensitive file systems, and the seed's `#include <WinSock2.h>` fails there.
#pragma once

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

#ifdef _WIN32
using socket_t = SOCKET;
constexpr socket_t kInvalidSocket = INVALID_SOCKET;
#else
using socket_t = int;
constexpr socket_t kInvalidSocket = -1;
#endif  // _WIN32

}  // namespace iocpnative
