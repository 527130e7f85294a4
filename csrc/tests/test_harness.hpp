// A minimal test runner in the manner of libuv's test/task.h: ASSERT_* macros that report the
// file, line and values and abort the test, a registry of tests, and a main() that runs one
// named test (CTest runs each as its own process with a timeout) or all of them.
// A test that cannot run here returns kSkip; CTest maps exit code 77 to "skipped".
#pragma once

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

// Defined in an ASan or TSan build (GCC and Clang spell it differently).
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define IOCPNATIVE_TEST_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define IOCPNATIVE_TEST_SANITIZED 1
#endif  // __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#endif  // sanitizer detection

namespace testh {

constexpr int kPass = 0;
constexpr int kSkip = 77;

struct Test {
    const char* name;
    std::function<int()> body;
};

inline std::vector<Test>& registry() {
    static std::vector<Test> tests;
    return tests;
}

struct Register {
    Register(const char* name, std::function<int()> body) {
        registry().push_back({name, std::move(body)});
    }
};

[[noreturn]] inline void fail(const char* file, int line, const std::string& what) {
    std::fprintf(stderr, "%s:%d: assertion failed: %s\n", file, line, what.c_str());
    std::fflush(stderr);
    std::abort();
}

// The backends a test should run on: `available` minus those named in the comma-separated
// IOCPNATIVE_TEST_SKIP_BACKENDS. `nox -s valgrind` sets it to io_uring: memcheck cannot follow
// the kernel's writes through the ring, and valgrind 3.19 hangs in the ring's wait.
inline std::vector<std::string> backends_under_test(std::vector<std::string> available) {
    const char* skip = std::getenv("IOCPNATIVE_TEST_SKIP_BACKENDS");
    if (skip == nullptr) return available;
    const std::string list = std::string(",") + skip + ",";
    std::vector<std::string> out;
    for (auto& name : available) {
        if (list.find("," + name + ",") == std::string::npos)
            out.push_back(std::move(name));
        else
            std::printf("  backend %s skipped (IOCPNATIVE_TEST_SKIP_BACKENDS)\n", name.c_str());
    }
    return out;
}

}  // namespace testh

#define TEST_CASE(name)                                    \
    static int name();                                     \
    static ::testh::Register register_##name(#name, name); \
    static int name()

#define ASSERT_TRUE(expr)                                      \
    do {                                                       \
        if (!(expr)) ::testh::fail(__FILE__, __LINE__, #expr); \
    } while (0)

#define ASSERT_OP(a, op, b)                                                                    \
    do {                                                                                       \
        const auto va_ = (a);                                                                  \
        const auto vb_ = (b);                                                                  \
        if (!(va_ op vb_)) {                                                                   \
            ::testh::fail(__FILE__, __LINE__,                                                  \
                          std::string(#a " " #op " " #b " (") + std::to_string(va_) + " vs " + \
                              std::to_string(vb_) + ")");                                      \
        }                                                                                      \
    } while (0)

#define ASSERT_EQ(a, b) ASSERT_OP(a, ==, b)
#define ASSERT_NE(a, b) ASSERT_OP(a, !=, b)
#define ASSERT_GE(a, b) ASSERT_OP(a, >=, b)
#define ASSERT_LE(a, b) ASSERT_OP(a, <=, b)
#define ASSERT_GT(a, b) ASSERT_OP(a, >, b)

// Defines main(): `prog` lists tests, `prog NAME` runs one, `prog --all` runs all in-process.
#define TEST_MAIN()                                                            \
    int main(int argc, char** argv) {                                          \
        auto& tests = ::testh::registry();                                     \
        if (argc < 2) {                                                        \
            for (auto& t : tests) std::printf("%s\n", t.name);                 \
            return 0;                                                          \
        }                                                                      \
        const bool all = std::strcmp(argv[1], "--all") == 0;                   \
        int ran = 0, rc = 0;                                                   \
        for (auto& t : tests) {                                                \
            if (!all && std::strcmp(t.name, argv[1]) != 0) continue;           \
            ++ran;                                                             \
            const int r = t.body();                                            \
            std::printf("%s %s\n",                                             \
                        r == ::testh::kPass   ? "ok"                           \
                        : r == ::testh::kSkip ? "skip"                         \
                                              : "FAIL",                        \
                        t.name);                                               \
            if (r != ::testh::kPass && !(r == ::testh::kSkip && !all)) rc = r; \
            if (r == ::testh::kSkip && !all) rc = r;                           \
        }                                                                      \
        if (ran == 0) {                                                        \
            std::fprintf(stderr, "no test named %s\n", argv[1]);               \
            return 2;                                                          \
        }                                                                      \
        return rc;                                                             \
    }
