// The native echo server: the seed's server.c as a reusable object.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "iocpnative/config.hpp"

namespace iocpnative {

// Lets code outside the core decide what goes back on a connection (Python handlers). Called on
// worker threads; one connection's calls never overlap.
class DataHandler {
public:
    virtual ~DataHandler() = default;
    // `data` is one received chunk (TCP has no message boundaries). Append the reply to `out`
    // (leave it empty to send nothing). Return false to close the connection: a handler error.
    virtual bool on_data(uint64_t conn_id, const char* data, size_t len, std::string& out) = 0;
    virtual void on_connect(uint64_t /*conn_id*/, const std::string& /*peer*/) {}
    virtual void on_disconnect(uint64_t /*conn_id*/) {}
};

class ServerCore;

class Server {
public:
    explicit Server(ServerConfig cfg, std::shared_ptr<DataHandler> handler = nullptr);
    ~Server();  // stops (and waits) if still running
    Server(const Server&) = delete;
    Server& operator=(const Server&) = delete;

    // Validates, resolves the backend, binds and listens, starts the workers. Throws
    // std::invalid_argument, SystemError (EADDRINUSE ...), std::logic_error when started twice.
    void start();
    // Stops accepting, closes every connection, drains every completion, joins the workers and
    // frees the pool. Idempotent. Throws TimeoutError if the workers did not finish in time
    // (only possible while a handler blocks); calling stop() again keeps waiting.
    void stop(double timeout_s = 5.0);

    bool running() const;
    uint16_t port() const;                // the bound port (after start)
    const std::string& host() const;
    const std::string& backend() const;  // resolved name (after start), else the requested one
    int workers() const;                  // resolved count
    ServerStats stats() const;

private:
    std::shared_ptr<ServerCore> core_;
};

}  // namespace iocpnative
