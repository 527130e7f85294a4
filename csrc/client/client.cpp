#include "iocpnative/client.hpp"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <stdexcept>
#include <string>

#include "../core/net.hpp"
#include "iocpnative/config.hpp"
#include "iocpnative/errors.hpp"

#ifdef _WIN32
#define IOCPNATIVE_POLL ::WSAPoll
using pollfd_t = WSAPOLLFD;
#else
#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>
#define IOCPNATIVE_POLL ::poll
using pollfd_t = pollfd;
#endif  // _WIN32

namespace iocpnative {

namespace {

int64_t now_ms() {
    using namespace std::chrono;
    return duration_cast<milliseconds>(steady_clock::now().time_since_epoch()).count();
}

bool would_block(int err) {
    return err == EAGAIN || err == EWOULDBLOCK || err == EINPROGRESS;
}

// One chunk per call keeps each send/recv length within int on Windows.
constexpr size_t kMaxChunk = size_t{1} << 30;

// Flags of every send/recv that must not block. POSIX: the connected socket blocks (see
// request()), so each call says so itself. Winsock has no MSG_DONTWAIT: the socket stays
// non-blocking there.
#ifdef _WIN32
constexpr int kNoWait = 0;
#else
constexpr int kNoWait = MSG_DONTWAIT;
#endif  // _WIN32

// Milliseconds left until deadline_ms (-1: no deadline, wait without limit), capped to fit an
// int; throws TimeoutError once it has passed.
int ms_left(int64_t deadline_ms, double timeout_s) {
    if (deadline_ms < 0) return -1;
    const int64_t left = deadline_ms - now_ms();
    if (left <= 0) throw TimeoutError("timed out after " + std::to_string(timeout_s) + " s");
    return static_cast<int>(std::min<int64_t>(left, int64_t{1} << 30));
}

// Waits for a non-blocking connect to finish, either way; the caller reads SO_ERROR. Returns
// true when the OS reported a failure that SO_ERROR might not name (Windows' except set).
// Throws TimeoutError at the deadline.
//
// Windows: select(), whose except set is where Winsock reports a failed connect. WSAPoll before
// Windows 10 version 2004 does not report it at all (no POLLERR, no POLLHUP), so a refused
// connect would wait out the whole timeout, or forever without one (ros/ros_comm#1816). Winsock's
// fd_set is a list of handles, not a bitmap: FD_SETSIZE does not limit the handle's value.
bool wait_connected(socket_t s, int64_t deadline_ms, double timeout_s) {
    for (;;) {
        const int wait = ms_left(deadline_ms, timeout_s);
#ifdef _WIN32
        fd_set writable, failed;
        FD_ZERO(&writable);
        FD_ZERO(&failed);
        FD_SET(s, &writable);
        FD_SET(s, &failed);
        timeval tv{};
        tv.tv_sec = wait / 1000;
        tv.tv_usec = (wait % 1000) * 1000;
        const int n = ::select(0, nullptr, &writable, &failed, wait < 0 ? nullptr : &tv);
        if (n == SOCKET_ERROR) throw make_system_error(last_socket_error(), "select");
        if (n == 0) continue;  // ms_left raises at the deadline
        return FD_ISSET(s, &failed) != 0;
#else
        pollfd p{};
        p.fd = s;
        p.events = POLLOUT;
        const int n = ::poll(&p, 1, wait);
        if (n < 0) {
            if (errno == EINTR) continue;
            throw make_system_error(errno, "poll");
        }
        if (n == 0) continue;  // ms_left raises at the deadline
        return false;          // a failed connect sets SO_ERROR and POLLERR together here
#endif  // _WIN32
    }
}

}  // namespace

Client::Client(const std::string& host, uint16_t port, double timeout_s, int recv_buffer_bytes)
    : timeout_s_(timeout_s) {
    if (recv_buffer_bytes < 0) {
        throw std::invalid_argument("recv_buffer_bytes must be >= 0, got " +
                                    std::to_string(recv_buffer_bytes));
    }
    net::ensure_initialized();
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_protocol = IPPROTO_TCP;
    addrinfo* res = nullptr;
    const std::string service = std::to_string(port);
    const int gai = ::getaddrinfo(host.c_str(), service.c_str(), &hints, &res);
    if (gai != 0 || res == nullptr) {
        throw std::invalid_argument("cannot resolve host '" + host +
                                    "': " + std::string(gai_strerror(gai)));
    }
    const int64_t dl = deadline();
    int err = ECONNREFUSED;
    bool timed_out = false;
    for (addrinfo* ai = res; ai != nullptr && sock_ == kInvalidSocket; ai = ai->ai_next) {
        socket_t s = net::open_socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
        if (s == kInvalidSocket) {
            err = last_socket_error();
            continue;
        }
        net::set_nonblocking(s, true);
        net::set_nodelay(s);
        if (recv_buffer_bytes > 0 && ::setsockopt(s, SOL_SOCKET, SO_RCVBUF,
                                                  reinterpret_cast<const char*>(&recv_buffer_bytes),
                                                  sizeof(recv_buffer_bytes)) != 0) {
            err = last_socket_error();
            net::close_socket(s);
            continue;
        }
        if (::connect(s, ai->ai_addr, static_cast<socklen_t>(ai->ai_addrlen)) != 0) {
            err = last_socket_error();
            if (!would_block(err)) {
                net::close_socket(s);
                continue;
            }
            bool failed = false;
            try {
                failed = wait_connected(s, dl, timeout_s_);
            } catch (const TimeoutError&) {
                net::close_socket(s);
                timed_out = true;
                break;
            } catch (...) {  // select/poll itself failed
                net::close_socket(s);
                ::freeaddrinfo(res);
                throw;
            }
            int so_err = 0;
            socklen_t len = sizeof(so_err);
            if (::getsockopt(s, SOL_SOCKET, SO_ERROR, reinterpret_cast<char*>(&so_err), &len) !=
                0) {
                err = last_socket_error();
                net::close_socket(s);
                continue;
            }
            err = errno_from_native(so_err);
            // A failure reported without a code still failed: the next address is tried.
            if (err == 0 && failed) err = ECONNREFUSED;
            if (err != 0) {
                net::close_socket(s);
                continue;
            }
        }
        sock_ = s;
    }
    ::freeaddrinfo(res);
    if (timed_out) {
        throw TimeoutError("connect to " + host + ":" + service + " timed out");
    }
    if (sock_ == kInvalidSocket) {
        throw make_system_error(err, "connect to " + host + ":" + service);
    }
#ifndef _WIN32
    net::set_nonblocking(sock_, false);
    apply_recv_timeout();
#endif  // _WIN32
}

void Client::set_timeout(double timeout_s) noexcept {
    timeout_s_ = timeout_s;
    apply_recv_timeout();
}

void Client::apply_recv_timeout() noexcept {
#ifndef _WIN32
    if (sock_ == kInvalidSocket) return;
    timeval tv{};  // zero: no limit
    if (timeout_s_ > 0 && timeout_s_ < kNeverSeconds) {
        const auto us = static_cast<int64_t>(timeout_s_ * 1e6 + 0.5);
        tv.tv_sec = static_cast<time_t>(us / 1000000);
        tv.tv_usec = static_cast<suseconds_t>(us % 1000000);
        if (tv.tv_sec == 0 && tv.tv_usec == 0) tv.tv_usec = 1;
    }
    // It cannot fail on a valid socket; if it did, request() would only block longer in its one
    // blocking recv, never return early.
    (void)::setsockopt(sock_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
#endif  // _WIN32
}

Client::~Client() {
    close();
}

void Client::close() noexcept {
    net::close_socket(sock_);
    sock_ = kInvalidSocket;
}

void Client::require_open() const {
    if (sock_ == kInvalidSocket) throw std::logic_error("client is closed");
}

int64_t Client::deadline() const {
    if (!(timeout_s_ > 0) || timeout_s_ >= kNeverSeconds) return -1;  // no deadline
    return now_ms() + static_cast<int64_t>(timeout_s_ * 1000.0 + 0.5);
}

void Client::wait_io(bool want_read, bool want_write, int64_t deadline_ms, bool& readable,
                     bool& writable) {
    for (;;) {
        pollfd_t p{};
        p.fd = sock_;
        p.events = static_cast<short>((want_read ? POLLIN : 0) | (want_write ? POLLOUT : 0));
        const int n = IOCPNATIVE_POLL(&p, 1, ms_left(deadline_ms, timeout_s_));
        if (n < 0) {
            const int err = last_socket_error();
            if (err == EINTR) continue;
            throw make_system_error(err, "poll");
        }
        if (n == 0) continue;  // the deadline check above raises
        // Errors and hang-ups surface through the next recv/send with the right errno.
        const bool bad = (p.revents & (POLLERR | POLLHUP | POLLNVAL)) != 0;
        readable = want_read && ((p.revents & POLLIN) != 0 || bad);
        writable = want_write && ((p.revents & POLLOUT) != 0 || bad);
        if (readable || writable) return;
    }
}

size_t Client::send(const char* data, size_t len) {
    require_open();
    const int64_t dl = deadline();
    size_t done = 0;
    while (done < len) {
        const size_t chunk = std::min(len - done, kMaxChunk);
        const auto n =
            ::send(sock_, data + done, static_cast<io_len_t>(chunk), kSendFlags | kNoWait);
        if (n >= 0) {
            done += static_cast<size_t>(n);
            continue;
        }
        const int err = last_socket_error();
        if (err == EINTR) continue;
        if (!would_block(err)) throw make_system_error(err, "send");
        bool r = false, w = false;
        wait_io(false, true, dl, r, w);
    }
    return len;
}

size_t Client::recv(char* out, size_t max_bytes) {
    require_open();
    if (max_bytes == 0) return 0;
    const int64_t dl = deadline();
    const size_t chunk = std::min(max_bytes, kMaxChunk);
    // POSIX: the first recv blocks (at most SO_RCVTIMEO = the timeout), so waiting for data is
    // one system call, not recv, poll, recv; after a signal or the timeout the loop polls up to
    // the same deadline. Winsock: the socket does not block, the first call neither.
    int flags = 0;
    for (;;) {
        const auto n = ::recv(sock_, out, static_cast<io_len_t>(chunk), flags);
        flags = kNoWait;
        if (n >= 0) return static_cast<size_t>(n);
        const int err = last_socket_error();
        if (err == EINTR) continue;
        if (!would_block(err)) throw make_system_error(err, "recv");
        bool r = false, w = false;
        wait_io(true, false, dl, r, w);
    }
}

void Client::request(const char* data, size_t len, char* out) {
    require_open();
    const int64_t dl = deadline();
    size_t sent = 0, got = 0;
#ifndef _WIN32
    // The common case in two system calls: one send takes the whole request (it fits the socket
    // buffer), then one blocking recv (MSG_WAITALL, at most SO_RCVTIMEO = the timeout) reads the
    // whole echo; nothing is left to send, so waiting only for the reply cannot deadlock. The
    // loop below goes on from wherever this stops: a partial send, a short read (the timeout, a
    // signal), an error it reports.
    if (len > 0) {
        const auto n = ::send(sock_, data, std::min(len, kMaxChunk), kSendFlags | MSG_DONTWAIT);
        if (n > 0) sent = static_cast<size_t>(n);
        if (sent == len) {
            const auto r = ::recv(sock_, out, std::min(len, kMaxChunk), MSG_WAITALL);
            if (r > 0) got = static_cast<size_t>(r);
        }
    }
#endif  // _WIN32
    // Send before polling: the socket is nearly always writable, and a poll first costs a system
    // call per request. Only a send that would block makes the next round poll for both ways.
    bool try_send = true;
    while (got < len) {
        bool readable = false, writable = false;
        if (try_send && sent < len) {
            writable = true;
        } else {
            wait_io(true, sent < len, dl, readable, writable);
        }
        try_send = false;
        if (writable && sent < len) {
            const size_t chunk = std::min(len - sent, kMaxChunk);
            const auto n =
                ::send(sock_, data + sent, static_cast<io_len_t>(chunk), kSendFlags | kNoWait);
            if (n >= 0) {
                sent += static_cast<size_t>(n);
                try_send = true;
            } else {
                const int err = last_socket_error();
                if (!would_block(err) && err != EINTR) throw make_system_error(err, "send");
            }
        }
        if (readable) {
            const size_t chunk = std::min(len - got, kMaxChunk);
            const auto n = ::recv(sock_, out + got, static_cast<io_len_t>(chunk), kNoWait);
            if (n == 0) {
                throw SystemError(ECONNRESET, "connection closed by the server after " +
                                                  std::to_string(got) + " of " +
                                                  std::to_string(len) + " bytes");
            }
            if (n > 0) {
                got += static_cast<size_t>(n);
            } else {
                const int err = last_socket_error();
                if (!would_block(err) && err != EINTR) throw make_system_error(err, "recv");
            }
        }
    }
}

void Client::shutdown_write() {
    require_open();
#ifdef _WIN32
    const int how = SD_SEND;
#else
    const int how = SHUT_WR;
#endif  // _WIN32
    if (::shutdown(sock_, how) != 0) throw make_system_error(last_socket_error(), "shutdown");
}

}  // namespace iocpnative
