// The native echo server: the seed's server.c as a reusable object.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "iocpnative/config.hpp"

namespace iocpnative {

// One received chunk handed to DataHandler::on_batch, and what the handler made of it.
struct DataChunk {
    uint64_t conn_id = 0;
    const char* data = nullptr;  // valid during the on_batch call only
    size_t len = 0;
    std::string out;       // the reply; left empty, nothing is sent
    bool handled = false;  // the handler ran for this chunk
    bool ok = true;        // false: a handler error, the connection is closed
};

// Lets code outside the core decide what goes back on a connection (Python handlers). Called on
// worker threads; one connection's calls never overlap. on_disconnect is called once for every
// connection on_connect was called for.
class DataHandler {
  public:
    virtual ~DataHandler() = default;
    // `data` is one received chunk (TCP has no message boundaries). Append the reply to `out`
    // (leave it empty to send nothing). Return false to close the connection: a handler error.
    virtual bool on_data(uint64_t conn_id, const char* data, size_t len, std::string& out) = 0;
    // All chunks one worker took from one completion batch, so that an implementation can pay
    // its per-call set-up (a Python handler: taking the GIL) once per batch. Sets `handled`,
    // `ok` and `out` of each chunk. It may leave chunks unhandled once `stopping` is true (stop()
    // was called while it ran): their connections are closed, as the drain would close them.
    virtual void on_batch(DataChunk* chunks, size_t n, const std::atomic<bool>& stopping);
    // Returning false closes the connection at once and counts a handler error.
    virtual bool on_connect(uint64_t /*conn_id*/, const std::string& /*peer*/) { return true; }
    // Returning false counts a handler error (the connection is gone either way).
    virtual bool on_disconnect(uint64_t /*conn_id*/) { return true; }
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
    uint16_t port() const;  // the bound port (after start)
    const std::string& host() const;
    std::string backend() const;  // resolved name (after start), else the requested one
    int workers() const;          // resolved count
    ServerStats stats() const;

  private:
    std::shared_ptr<ServerCore> core_;
};

}  // namespace iocpnative
