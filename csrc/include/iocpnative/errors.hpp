// Errors that cross the native/Python boundary.
//
// Every failed system call becomes a SystemError carrying a POSIX errno value (Winsock codes are
// translated, see net.cpp), so Python raises OSError subclasses such as ConnectionRefusedError
// with the same errno on every platform. Bad arguments are std::invalid_argument (ValueError),
// wrong states std::logic_error (RuntimeError).
#pragma once

#include <stdexcept>
#include <string>

namespace iocpnative {

class SystemError : public std::runtime_error {
  public:
    SystemError(int err, const std::string& what) : std::runtime_error(what), err_(err) {}
    // A POSIX errno value (EADDRINUSE, ECONNREFUSED, ...).
    int code() const noexcept { return err_; }

  private:
    int err_;
};

// A deadline passed (connect, recv, or stop(timeout) with workers that did not finish).
class TimeoutError : public std::runtime_error {
  public:
    using std::runtime_error::runtime_error;
};

// Builds a SystemError for `err`: "<context>: <strerror(err)> (errno N)".
SystemError make_system_error(int err, const std::string& context);

// The calling thread's last socket error as an errno value (errno, or WSAGetLastError mapped).
int last_socket_error() noexcept;

// Maps a Winsock/Win32 error code to the closest errno value; identity elsewhere.
int errno_from_native(int native) noexcept;

}  // namespace iocpnative
