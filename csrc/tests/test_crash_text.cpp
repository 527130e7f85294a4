// crash_text: the allocation-free formatting the crash handlers write reports and file names
// with (dates, numbers, report names, truncation). Plain functions, so every platform runs it.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>

#include "crash/crash_text.hpp"
#include "test_harness.hpp"

using iocpnative::crash_text::Civil;
using iocpnative::crash_text::Text;
using iocpnative::crash_text::to_civil;

namespace {

bool same(const char* got, const char* want) {
    if (std::strcmp(got, want) == 0) return true;
    std::printf("  got  \"%s\"\n  want \"%s\"\n", got, want);
    return false;
}

// "YYYY-MM-DDTHH:MM:SSZ" for `unix_seconds`, through to_civil and put_iso_time.
const char* iso(int64_t unix_seconds, char* buf, size_t cap) {
    Text t(buf, cap);
    t.put_iso_time(to_civil(unix_seconds));
    return t.c_str();
}

}  // namespace

TEST_CASE(civil_time_matches_known_dates) {
    char b[64];
    ASSERT_TRUE(same(iso(0, b, sizeof b), "1970-01-01T00:00:00Z"));
    ASSERT_TRUE(same(iso(-1, b, sizeof b), "1969-12-31T23:59:59Z"));
    ASSERT_TRUE(same(iso(951782400, b, sizeof b), "2000-02-29T00:00:00Z"));  // a 400-year leap day
    ASSERT_TRUE(same(iso(1709251199, b, sizeof b), "2024-02-29T23:59:59Z"));
    ASSERT_TRUE(same(iso(1709251200, b, sizeof b), "2024-03-01T00:00:00Z"));
    ASSERT_TRUE(same(iso(4107542400, b, sizeof b), "2100-03-01T00:00:00Z"));  // 2100 is not leap
    ASSERT_TRUE(same(iso(1795850100, b, sizeof b), "2026-11-28T07:15:00Z"));
    ASSERT_TRUE(same(iso(-2208988800, b, sizeof b), "1900-01-01T00:00:00Z"));
    return 0;
}

TEST_CASE(report_names_carry_pid_time_and_number) {
    const Civil c = to_civil(1795850100);
    char b[64];
    {
        Text t(b, sizeof b);
        t.put_report_name(4242, c, 1, ".crash");
        ASSERT_TRUE(same(t.c_str(), "4242-20261128T071500Z.crash"));
        ASSERT_TRUE(!t.truncated());
    }
    {
        Text t(b, sizeof b);
        t.put("iocpnative-");
        t.put_report_name(7, c, 3, ".dmp");
        ASSERT_TRUE(same(t.c_str(), "iocpnative-7-20261128T071500Z-3.dmp"));
    }
    {
        Text t(b, sizeof b);
        t.put_report_name(7, c, 12, ".dmp");
        ASSERT_TRUE(same(t.c_str(), "7-20261128T071500Z-12.dmp"));
    }
    return 0;
}

TEST_CASE(numbers_format_in_full) {
    char b[64];
    {
        Text t(b, sizeof b);
        t.put_dec(0);
        t.put_char(' ');
        t.put_dec(-42);
        t.put_char(' ');
        t.put_dec(std::numeric_limits<int64_t>::min());
        t.put_char(' ');
        t.put_dec(std::numeric_limits<int64_t>::max());
        ASSERT_TRUE(same(t.c_str(), "0 -42 -9223372036854775808 9223372036854775807"));
    }
    {
        Text t(b, sizeof b);
        t.put_unsigned(7, 4);
        t.put_char(' ');
        t.put_unsigned(123456, 2);
        ASSERT_TRUE(same(t.c_str(), "0007 123456"));
    }
    {
        Text t(b, sizeof b);
        t.put_hex(0xbeef);
        // "0x" and every digit of the pointer width.
        ASSERT_EQ(t.size(), 2 + sizeof(uintptr_t) * 2);
        ASSERT_TRUE(std::strncmp(t.c_str(), "0x", 2) == 0);
        ASSERT_TRUE(same(t.c_str() + t.size() - 6, "00beef"));
    }
    return 0;
}

TEST_CASE(text_truncates_and_says_so) {
    char b[8];
    std::memset(b, 'x', sizeof b);
    Text t(b, sizeof b);
    t.put("iocpnative");
    ASSERT_TRUE(t.truncated());
    ASSERT_EQ(t.size(), sizeof b - 1);  // room kept for the terminating NUL
    ASSERT_TRUE(same(t.c_str(), "iocpnat"));
    char tiny[1];
    Text empty(tiny, sizeof tiny);
    empty.put_dec(5);
    ASSERT_TRUE(empty.truncated());
    ASSERT_TRUE(same(empty.c_str(), ""));
    return 0;
}

TEST_MAIN()
