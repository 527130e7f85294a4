#include "io_data.hpp"

#include <algorithm>
#include <cstdlib>
#include <new>

namespace iocpnative {

namespace {

// The cache bound in blocks: `max_cached`, lowered so that the cached blocks stay within
// kMaxCachedBytes, but at least a few so that a steady stream of operations does not call
// malloc for every one.
size_t cache_bound(size_t buffer_size, size_t max_cached) {
    const size_t by_bytes = IoDataPool::kMaxCachedBytes / (sizeof(IoData) + buffer_size);
    return std::min(max_cached, std::max<size_t>(by_bytes, 4));
}

}  // namespace

IoDataPool::IoDataPool(size_t buffer_size, bool shared, size_t max_cached)
    : buffer_size_(buffer_size),
      shared_(shared),
      max_cached_(cache_bound(buffer_size, max_cached)) {}

IoDataPool::~IoDataPool() {
    trim();
}

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
