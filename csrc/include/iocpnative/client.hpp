// A blocking TCP client with a timeout on every call: the seed's client.c as an object.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "iocpnative/platform.hpp"

namespace iocpnative {

class Client {
  public:
    // Connects (IPv4 or IPv6, numeric or by name). timeout_s <= 0 means no limit.
    // recv_buffer_bytes > 0 sets SO_RCVBUF before connecting (a fixed receive window: the kernel
    // no longer autotunes it; Linux doubles the value and clamps it to net.core.rmem_max);
    // 0 keeps the system's default.
    // Throws SystemError (ECONNREFUSED, ...), TimeoutError, std::invalid_argument (bad host,
    // negative recv_buffer_bytes).
    Client(const std::string& host, uint16_t port, double timeout_s, int recv_buffer_bytes = 0);
    ~Client();
    Client(const Client&) = delete;
    Client& operator=(const Client&) = delete;

    // Sends all of `data` (blocking until done or timeout). Returns len.
    size_t send(const char* data, size_t len);
    // Reads up to max_bytes; returns 0 at EOF.
    size_t recv(char* out, size_t max_bytes);
    // Sends `len` bytes and reads back exactly `len` bytes into `out`, reading while sending so
    // payloads larger than the socket buffers cannot deadlock. Throws SystemError(ECONNRESET)
    // with "connection closed" when the peer closes early.
    void request(const char* data, size_t len, char* out);
    // Half-close: no more sends (the peer sees EOF), replies still readable.
    void shutdown_write();
    void close() noexcept;
    bool closed() const noexcept { return sock_ == kInvalidSocket; }
    double timeout() const noexcept { return timeout_s_; }
    void set_timeout(double timeout_s) noexcept;

  private:
    void require_open() const;
    // Waits for readability/writability; throws TimeoutError at the deadline.
    // Returns (readable, writable).
    void wait_io(bool want_read, bool want_write, int64_t deadline_ms, bool& readable,
                 bool& writable);
    int64_t deadline() const;
    // POSIX: the connected socket blocks, with SO_RCVTIMEO = the timeout, for request()'s one
    // blocking recv; every other call passes MSG_DONTWAIT. Winsock: it stays non-blocking.
    void apply_recv_timeout() noexcept;

    socket_t sock_ = kInvalidSocket;
    double timeout_s_;
};

}  // namespace iocpnative
