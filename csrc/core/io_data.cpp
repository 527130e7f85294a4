#include "io_data.hpp"

#include <cstdlib>
#include <new>

namespace iocpnative {

IoDataPool::IoDataPool(size_t buffer_size, bool shared, size_t max_cached)
    : buffer_size_(buffer_size), shared_(shared), max_cached_(max_cached) {}

IoDataPool::~IoDataPool() { trim(); }

void IoDataPool::trim() noexcept {
    std::unique_lock<std::mutex> guard(lock_, std::defer_lock);
    if (shared_) guard.lock();
    while (free_ != nullptr) {
        IoData* next = free_->next_free;
        free_->~IoData();
        std::free(free_);
        free_ = next;
        add(counters_.allocated, -1);
    }
    cached_ = 0;
}

IoData* IoDataPool::acquire() {
    if (!shared_) return acquire_unlocked();
    std::lock_guard<std::mutex> guard(lock_);
    return acquire_unlocked();
}

void IoDataPool::release(IoData* io) noexcept {
    if (io == nullptr) return;
    if (!shared_) return release_unlocked(io);
    std::lock_guard<std::mutex> guard(lock_);
    release_unlocked(io);
}

IoData* IoDataPool::acquire_unlocked() {
    IoData* io = free_;
    if (io != nullptr) {
        free_ = io->next_free;
        --cached_;
    } else {
        void* mem = std::malloc(sizeof(IoData) + buffer_size_);
        if (mem == nullptr) return nullptr;
        io = new (mem) IoData();
        io->capacity = static_cast<uint32_t>(buffer_size_);
        add(counters_.allocated, 1);
    }
    io->conn = nullptr;
    io->next_free = nullptr;
    io->op = Op::None;
    io->len = 0;
    io->offset = 0;
    io->accept_socket = kInvalidSocket;
    add(counters_.in_use, 1);
    return io;
}

void IoDataPool::release_unlocked(IoData* io) noexcept {
    add(counters_.in_use, -1);
    if (cached_ >= max_cached_) {
        io->~IoData();
        std::free(io);
        add(counters_.allocated, -1);
        return;
    }
    io->op = Op::None;
    io->conn = nullptr;
    io->next_free = free_;
    free_ = io;
    ++cached_;
}

}  // namespace iocpnative
