// IoDataPool: counters, reuse, the cache bound, trim, and the shared (locked) mode.
#include <thread>
#include <vector>

#include "core/io_data.hpp"
#include "test_harness.hpp"

using iocpnative::IoData;
using iocpnative::IoDataPool;

TEST_CASE(pool_counts_and_reuses) {
    IoDataPool pool(1024, false, 4);
    IoData* a = pool.acquire();
    ASSERT_TRUE(a != nullptr);
    ASSERT_EQ(a->capacity, 1024u);
    ASSERT_EQ(pool.in_use(), 1);
    ASSERT_EQ(pool.allocated(), 1);
    a->data()[1023] = 'x';  // the whole buffer is ours (ASan checks the bound)
    pool.release(a);
    ASSERT_EQ(pool.in_use(), 0);
    ASSERT_EQ(pool.allocated(), 1);
    IoData* b = pool.acquire();
    ASSERT_TRUE(b == a);  // LIFO: the block released last comes back first
    ASSERT_EQ(b->len, 0u);
    ASSERT_EQ(b->offset, 0u);
    pool.release(b);
    pool.trim();
    ASSERT_EQ(pool.allocated(), 0);
    return 0;
}

TEST_CASE(pool_cache_is_bounded) {
    IoDataPool pool(64, false, 4);
    std::vector<IoData*> v;
    for (int i = 0; i < 100; ++i) v.push_back(pool.acquire());
    ASSERT_EQ(pool.in_use(), 100);
    ASSERT_EQ(pool.allocated(), 100);
    for (IoData* io : v) pool.release(io);
    ASSERT_EQ(pool.in_use(), 0);
    ASSERT_EQ(pool.allocated(), 4);  // only max_cached blocks stay
    return 0;
}

TEST_CASE(pool_cache_is_bounded_in_bytes) {
    // 64 KiB blocks: 256 cached would pin 16 MiB; the byte bound keeps about 1 MiB.
    const size_t size = 64u << 10;
    IoDataPool pool(size, false);
    std::vector<IoData*> v;
    for (int i = 0; i < 64; ++i) v.push_back(pool.acquire());
    for (IoData* io : v) pool.release(io);
    const int64_t expect =
        static_cast<int64_t>(IoDataPool::kMaxCachedBytes / (sizeof(IoData) + size));
    ASSERT_EQ(pool.allocated(), expect);
    ASSERT_TRUE(expect >= 4 && expect <= 16);
    return 0;
}

TEST_CASE(pool_destructor_frees_cache) {
    auto* pool = new IoDataPool(64, false);
    for (int i = 0; i < 10; ++i) pool->release(pool->acquire());
    delete pool;  // LSan reports the blocks if the destructor forgot them
    return 0;
}

TEST_CASE(pool_shared_across_threads) {
    IoDataPool pool(256, true, 16);
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t) {
        threads.emplace_back([&pool] {
            for (int i = 0; i < 20000; ++i) {
                IoData* a = pool.acquire();
                IoData* b = pool.acquire();
                a->data()[0] = 1;
                b->data()[255] = 2;
                pool.release(a);
                pool.release(b);
            }
        });
    }
    for (auto& th : threads) th.join();
    ASSERT_EQ(pool.in_use(), 0);
    ASSERT_LE(pool.allocated(), 16);
    pool.trim();
    ASSERT_EQ(pool.allocated(), 0);
    return 0;
}

TEST_MAIN()
