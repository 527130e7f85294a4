#include "connection.hpp"

namespace iocpnative {

void ConnectionTable::add(Connection* c) {
    std::unique_lock<std::mutex> guard(lock_, std::defer_lock);
    if (shared_) guard.lock();
    c->prev = nullptr;
    c->next = head_;
    if (head_ != nullptr) head_->prev = c;
    head_ = c;
    size_.store(size_.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
}

void ConnectionTable::remove(Connection* c) {
    std::unique_lock<std::mutex> guard(lock_, std::defer_lock);
    if (shared_) guard.lock();
    if (c->prev != nullptr)
        c->prev->next = c->next;
    else
        head_ = c->next;
    if (c->next != nullptr) c->next->prev = c->prev;
    c->prev = c->next = nullptr;
    size_.store(size_.load(std::memory_order_relaxed) - 1, std::memory_order_relaxed);
}

}  // namespace iocpnative
