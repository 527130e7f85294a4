#include "server_core.hpp"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <stdexcept>
#include <system_error>

#include "../crash/crash_thread.hpp"
#include "iocpnative/errors.hpp"
#include "net.hpp"
#include "worker.hpp"

namespace iocpnative {

namespace {
// How long a start() that could not create every worker thread waits for the ones it did create
// to stop (they have had no time to take work; only a handler that blocks at once could hold
// one).
constexpr double kStartFailureStopSeconds = 10.0;
}  // namespace

void validate(const ServerConfig& cfg) {
    if (cfg.workers < 0 || cfg.workers > kMaxWorkers) {
        throw std::invalid_argument("workers must be between 1 and " + std::to_string(kMaxWorkers) +
                                    " (or 0/None for one per CPU), got " +
                                    std::to_string(cfg.workers));
    }
    if (cfg.buffer_size < 1 || cfg.buffer_size > (64u << 20)) {
        throw std::invalid_argument("buffer_size must be between 1 and 67108864 bytes, got " +
                                    std::to_string(cfg.buffer_size));
    }
    if (cfg.max_connections < 1) {
        throw std::invalid_argument("max_connections must be >= 1, got " +
                                    std::to_string(cfg.max_connections));
    }
    if (!(cfg.idle_timeout >= 0.0)) {
        throw std::invalid_argument("idle_timeout must be a number of seconds > 0 (or None)");
    }
    if (cfg.batch_wait_us < 0 || cfg.batch_wait_us > kMaxBatchWaitUs) {
        throw std::invalid_argument("batch_wait_us must be between 0 and " +
                                    std::to_string(kMaxBatchWaitUs) + " microseconds, got " +
                                    std::to_string(cfg.batch_wait_us));
    }
    if (cfg.backlog < 1) throw std::invalid_argument("backlog must be >= 1");
}

ServerCore::ServerCore(ServerConfig cfg, std::shared_ptr<DataHandler> handler)
    : cfg_(std::move(cfg)), handler_(std::move(handler)), backend_name_(cfg_.backend) {}

ServerCore::~ServerCore() {
    free_resources();
}

ServerCore::State ServerCore::state() const {
    std::lock_guard<std::mutex> g(mu_);
    return state_;
}

void ServerCore::start() {
    std::unique_lock<std::mutex> g(mu_);
    if (state_ != State::Idle) {
        throw std::logic_error(state_ == State::Running ? "server is already running"
                                                        : "a stopped server cannot be restarted; "
                                                          "create a new Server");
    }
    validate(cfg_);
    const std::string resolved = resolve_backend(cfg_.backend);
    int workers = cfg_.workers;
    if (workers == 0) {
        workers = std::clamp(static_cast<int>(std::thread::hardware_concurrency()), 1, kMaxWorkers);
    }

    net::Listener l = net::listen_tcp(cfg_.host, cfg_.port, cfg_.backlog);
    try {
        backend_ = create_backend(resolved);
        const bool shared = backend_->shared_queue();
        const int queues = shared ? 1 : workers;
        for (int i = 0; i < queues; ++i) {
            pools_.push_back(std::make_unique<IoDataPool>(cfg_.buffer_size, shared));
            tables_.push_back(std::make_unique<ConnectionTable>(shared));
        }
        // Listed after the worker pools, so that stats() and stop() count and trim it too.
        IoDataPool* header_pool = nullptr;
        if (shared) {
            pools_.push_back(std::make_unique<IoDataPool>(0, true));
            header_pool = pools_.back().get();
        }
        for (int i = 0; i < workers; ++i) {
            worker_stats_.push_back(std::make_unique<WorkerStats>());
            PollerContext ctx;
            ctx.index = i;
            ctx.workers = workers;
            ctx.listener = l.sock;
            const size_t q = shared ? 0 : static_cast<size_t>(i);
            ctx.pool = pools_[q].get();
            ctx.header_pool = header_pool;
            ctx.batch_wait_us = static_cast<unsigned>(cfg_.batch_wait_us);
            ctx.stats = worker_stats_.back().get();
            workers_.push_back(std::make_unique<Worker>(*this, i, backend_->make_poller(ctx),
                                                        *pools_[q], *tables_[q],
                                                        *worker_stats_.back()));
        }
        // Reserved here so that creating the threads below can only fail for want of a thread.
        threads_.reserve(workers_.size());
    } catch (...) {
        workers_.clear();
        backend_.reset();
        net::close_socket(l.sock);
        throw;
    }
    listener_ = l.sock;
    port_ = l.port;
    backend_name_ = resolved;
    worker_count_ = workers;
    finished_ = 0;
    state_ = State::Running;
    // The threads keep the core alive: stop() may return on a timeout while a handler blocks.
    auto self = shared_from_this();
    try {
        for (auto& w : workers_) {
            Worker* wp = w.get();
            threads_.emplace_back([self, wp] {
                // Crash capture runs on the faulting thread: give each worker its reserve stack.
                crash::prepare_thread();
                wp->run();
            });
        }
    } catch (const std::system_error& e) {
        // No thread for a worker (EAGAIN: thread or memory limits). Without this, running()
        // stayed true and every stop() waited for a worker that never started. The workers
        // without a thread go; the rest stop as in stop(), which frees everything.
        const size_t started = threads_.size();
        workers_.resize(started);
        const int err = e.code().value() != 0 ? e.code().value() : EAGAIN;
        g.unlock();
        try {
            stop(kStartFailureStopSeconds);
        } catch (const TimeoutError&) {
            // A handler blocks a worker that did start; a later stop() or the destructor ends it.
        }
        throw make_system_error(err, "start(): cannot create worker thread " +
                                         std::to_string(started + 1) + " of " +
                                         std::to_string(workers));
    }
}

void ServerCore::worker_finished() {
    std::lock_guard<std::mutex> g(mu_);
    ++finished_;
    finished_cv_.notify_all();
}

void ServerCore::stop(double timeout_s) {
    std::unique_lock<std::mutex> g(mu_);
    if (state_ == State::Idle || state_ == State::Stopped) return;
    if (state_ == State::Running) {
        state_ = State::Stopping;
        stop_requested_.store(true, std::memory_order_release);
        for (auto& w : workers_) w->poller().wake();  // one wake-up per worker
    }
    const int total = static_cast<int>(workers_.size());
    const auto all_finished = [&] { return finished_ >= total; };
    if (timeout_s >= kNeverSeconds) {
        finished_cv_.wait(g, all_finished);  // a deadline this far would overflow the clock
    } else if (!finished_cv_.wait_until(
                   g,
                   std::chrono::steady_clock::now() +
                       std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                           std::chrono::duration<double>(timeout_s < 0 ? 0 : timeout_s)),
                   all_finished)) {
        throw TimeoutError("stop() timed out: " + std::to_string(total - finished_) + " of " +
                           std::to_string(total) +
                           " workers still busy (a handler that has not returned, or connections"
                           " still closing); call stop() again");
    }
    if (joining_) {
        // Another stop() is joining the (finished) threads and freeing the pool; two joins of
        // one thread are undefined behaviour, so wait for that stop() to finish instead.
        finished_cv_.wait(g, [&] { return state_ == State::Stopped; });
        return;
    }
    joining_ = true;
    g.unlock();
    for (auto& t : threads_) {
        if (t.joinable()) t.join();
    }
    g.lock();
    threads_.clear();
    free_resources();
    state_ = State::Stopped;
    joining_ = false;
    finished_cv_.notify_all();
}

void ServerCore::free_resources() {
    if (!threads_.empty()) {
        // Destroyed with threads still running: only possible if stop() timed out and the owner
        // dropped the server. The threads hold a reference, so this runs on the last of them.
        for (auto& t : threads_) {
            if (t.joinable()) {
                if (t.get_id() == std::this_thread::get_id())
                    t.detach();
                else
                    t.join();
            }
        }
        threads_.clear();
    }
    workers_.clear();  // destroys the pollers (epoll sets, rings, ports)
    backend_.reset();
    net::close_socket(listener_);
    listener_ = kInvalidSocket;
    for (auto& p : pools_) p->trim();
}

ServerStats ServerCore::stats() const {
    std::lock_guard<std::mutex> g(mu_);
    ServerStats s;
    for (const auto& w : worker_stats_) {
        s.total_connections += w->total_connections.load(std::memory_order_relaxed);
        s.rejected_connections += w->rejected_connections.load(std::memory_order_relaxed);
        s.bytes_received += w->bytes_received.load(std::memory_order_relaxed);
        s.bytes_sent += w->bytes_sent.load(std::memory_order_relaxed);
        s.handler_errors += w->handler_errors.load(std::memory_order_relaxed);
        s.recv_buffers += w->recv_buffers.load(std::memory_order_relaxed);
    }
    for (const auto& p : pools_) {
        s.pool_in_use += p->in_use();
        s.pool_allocated += p->allocated();
    }
    // IOCP: the worker that posts a read counts its buffer and the one that completes it
    // uncounts it; read one after the other, the workers' counts may briefly sum below 0.
    s.recv_buffers = std::max<int64_t>(s.recv_buffers, 0);
    s.active_connections = active_.load(std::memory_order_relaxed);
    return s;
}

// --- DataHandler ---------------------------------------------------------------------------

void DataHandler::on_batch(DataChunk* chunks, size_t n, const std::atomic<bool>& stopping) {
    for (size_t i = 0; i < n && !stopping.load(std::memory_order_relaxed); ++i) {
        DataChunk& ch = chunks[i];
        ch.ok = on_data(ch.conn_id, ch.data, ch.len, ch.out);
        ch.handled = true;
    }
}

// --- Server: the public face ------------------------------------------------------------------

Server::Server(ServerConfig cfg, std::shared_ptr<DataHandler> handler)
    : core_(std::make_shared<ServerCore>(std::move(cfg), std::move(handler))) {}

Server::~Server() {
    try {
        core_->stop(30.0);
    } catch (...) {
        // The workers keep their own reference to the core and free it when they finish.
    }
}

void Server::start() {
    core_->start();
}
void Server::stop(double timeout_s) {
    core_->stop(timeout_s);
}
bool Server::running() const {
    return core_->state() == ServerCore::State::Running;
}
uint16_t Server::port() const {
    return core_->port();
}
const std::string& Server::host() const {
    return core_->config().host;
}
std::string Server::backend() const {
    return core_->backend_name();
}
int Server::workers() const {
    return core_->worker_count();
}
ServerStats Server::stats() const {
    return core_->stats();
}

}  // namespace iocpnative
