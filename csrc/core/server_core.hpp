// ServerCore: what a running server shares between its front object and its worker threads.
#pragma once

#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "../backend/backend.hpp"
#include "connection.hpp"
#include "io_data.hpp"
#include "iocpnative/server.hpp"
#include "stats.hpp"

namespace iocpnative {

class Worker;

class ServerCore : public std::enable_shared_from_this<ServerCore> {
  public:
    ServerCore(ServerConfig cfg, std::shared_ptr<DataHandler> handler);
    ~ServerCore();

    void start();
    void stop(double timeout_s);
    ServerStats stats() const;

    // Shared with the workers.
    const ServerConfig& config() const { return cfg_; }
    DataHandler* handler() const { return handler_.get(); }
    bool stop_requested() const { return stop_requested_.load(std::memory_order_acquire); }
    const std::atomic<bool>& stop_flag() const { return stop_requested_; }
    std::atomic<int64_t>& active_connections() { return active_; }
    uint64_t next_connection_id() { return next_id_.fetch_add(1, std::memory_order_relaxed) + 1; }
    void worker_finished();

    enum class State { Idle, Running, Stopping, Stopped };
    State state() const;
    // Written by start(); read under mu_ so that a thread asking while another starts the
    // server sees the values before or after, never half a string.
    uint16_t port() const {
        std::lock_guard<std::mutex> g(mu_);
        return port_;
    }
    std::string backend_name() const {
        std::lock_guard<std::mutex> g(mu_);
        return backend_name_;
    }
    int worker_count() const {
        std::lock_guard<std::mutex> g(mu_);
        return worker_count_;
    }

  private:
    void free_resources();

    ServerConfig cfg_;
    std::shared_ptr<DataHandler> handler_;
    std::string backend_name_;
    int worker_count_ = 0;
    uint16_t port_ = 0;
    socket_t listener_ = kInvalidSocket;

    std::unique_ptr<Backend> backend_;
    std::vector<std::unique_ptr<IoDataPool>> pools_;  // one per worker, or one shared + headers
    std::vector<std::unique_ptr<ConnectionTable>> tables_;    // likewise
    std::vector<std::unique_ptr<WorkerStats>> worker_stats_;  // one per worker
    std::vector<std::unique_ptr<Worker>> workers_;
    std::vector<std::thread> threads_;

    std::atomic<bool> stop_requested_{false};
    std::atomic<int64_t> active_{0};
    std::atomic<uint64_t> next_id_{0};

    mutable std::mutex mu_;  // guards state_, finished_, and start/stop sequencing
    std::condition_variable finished_cv_;
    int finished_ = 0;
    State state_ = State::Idle;
    bool joining_ = false;  // one stop() joins the threads and frees; concurrent ones wait for it
};

}  // namespace iocpnative
