// Worker: one native thread running the completion loop and the echo state machine.
//
//   Recv completed, n > 0  -> post Send of exactly those n bytes (or of the handler's reply;
//                             in handler mode the Recv completions of one batch are collected
//                             and handed to the handler together, then their replies posted)
//   Send completed         -> post the rest if it was short, else post the next Recv
//   Recv 0 / any error     -> close the connection; its IoData goes back to the pool
//
// This is the seed's WorkerThread, written once for every backend.
#pragma once

#include <cstddef>
#include <cstdint>
#include <exception>
#include <memory>
#include <vector>

#include "../backend/backend.hpp"
#include "connection.hpp"
#include "io_data.hpp"
#include "iocpnative/server.hpp"
#include "stats.hpp"

namespace iocpnative {

class ServerCore;

class Worker {
  public:
    Worker(ServerCore& core, int index, std::unique_ptr<Poller> poller, IoDataPool& pool,
           ConnectionTable& table, WorkerStats& stats);
    ~Worker();
    void run() noexcept;  // thread body; returns after stop() once everything has drained
    Poller& poller() { return *poller_; }

  private:
    void loop();
    void handle_events(const Event* events, int n);
    void handle_events_with_handler(const Event* events, int n);
    void dispatch(const Event& ev);
    void on_accepted(socket_t s);
    bool recv_usable(const Connection& c, int64_t result) const;
    void on_recv(Connection& c, IoData* io, int64_t result);
    void on_recv_failed(Connection& c, IoData* io);
    void on_send(Connection& c, IoData& io, int64_t result);
    void stage_chunk(Connection& c, IoData& io, int64_t result);
    void finish_chunk(DataChunk& chunk, Connection& c, IoData& io);
    size_t fail_first_unhandled(size_t from, size_t k, const char* what);
    // A handler's on_connect/on_disconnect: an exception it throws counts as "false" (a handler
    // error), logged, instead of stopping this worker.
    template <class Call>
    bool handler_says(uint64_t conn_id, Call&& call) {
        try {
            return call();
        } catch (const std::exception& e) {
            log_handler_exception(conn_id, e.what());
        } catch (...) {
            log_handler_exception(conn_id, "unknown exception");
        }
        return false;
    }
    static void log_handler_exception(uint64_t conn_id, const char* what);
    bool fill_from_pending(Connection& c, IoData& io);
    void post_recv(Connection& c);
    void post_send(Connection& c, IoData& io);
    void close_connection(Connection& c);
    void op_done(Connection& c);
    void op_done_check(Connection& c);
    void begin_drain();
    void scan_idle();
    void scan_buffers();
    bool scans_buffers() const { return buffer_scan_ms_ > 0 && (!table_.shared() || index_ == 0); }
    void request_close_shared(bool idle_only);
    bool is_idle(const Connection& c) const;
    void log_idle(const Connection& c) const;
    int wait_timeout_ms() const;
    void log_connect(const Connection& c) const;

    ServerCore& core_;
    const int index_;
    std::unique_ptr<Poller> poller_;
    IoDataPool& pool_;
    ConnectionTable& table_;
    WorkerStats& stats_;
    DataHandler* const handler_;  // nullptr: the plain echo path
    // Handler mode: the Recv completions of one wait() batch, handed to the handler at once.
    // staged_[i] is the (connection, buffer) of chunks_[i]; both keep their capacity.
    struct Staged {
        Connection* conn;
        IoData* io;
    };
    std::vector<Staged> staged_;
    std::vector<DataChunk> chunks_;
    bool draining_ = false;
    int64_t now_ms_ = 0;
    int64_t idle_ms_ = 0;  // idle timeout in ms, 0 = never
    int64_t next_idle_scan_ms_ = 0;
    int64_t buffer_scan_ms_ = 0;  // Poller::buffer_scan_ms(), 0 = the backend needs no scan
    int64_t next_buffer_scan_ms_ = 0;
};

int64_t monotonic_ms() noexcept;

}  // namespace iocpnative
