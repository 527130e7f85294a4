// Text formatting for crash handlers: no allocation, no locale, no stdio, so it is safe inside a
// signal handler or an unhandled-exception filter where the heap may be corrupt. Writes into a
// caller-provided buffer and truncates (and says so) rather than overflow.
#pragma once

#include <cstddef>
#include <cstdint>

namespace iocpnative {
namespace crash_text {

// A UTC calendar time.
struct Civil {
    int64_t year;
    unsigned month, day, hour, minute, second;
};

// Seconds since the Unix epoch -> UTC calendar time, with the days-to-civil algorithm from
// Howard Hinnant's "chrono-Compatible Low-Level Date Algorithms" (no gmtime_r: it is not on the
// async-signal-safe list).
inline Civil to_civil(int64_t unix_seconds) noexcept {
    int64_t days = unix_seconds / 86400;
    int64_t rem = unix_seconds % 86400;
    if (rem < 0) {
        rem += 86400;
        --days;
    }
    days += 719468;  // shift the epoch to 0000-03-01
    const int64_t era = (days >= 0 ? days : days - 146096) / 146097;
    const auto doe = static_cast<unsigned>(days - era * 146097);                 // [0, 146096]
    const unsigned yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;  // [0, 399]
    const unsigned doy = doe - (365 * yoe + yoe / 4 - yoe / 100);                // [0, 365]
    const unsigned mp = (5 * doy + 2) / 153;                                     // [0, 11]
    Civil c{};
    c.day = doy - (153 * mp + 2) / 5 + 1;
    c.month = mp < 10 ? mp + 3 : mp - 9;
    c.year = static_cast<int64_t>(yoe) + era * 400 + (c.month <= 2 ? 1 : 0);
    const auto secs = static_cast<unsigned>(rem);
    c.hour = secs / 3600;
    c.minute = secs / 60 % 60;
    c.second = secs % 60;
    return c;
}

class Text {
  public:
    Text(char* buf, size_t cap) noexcept : buf_(buf), cap_(cap) { buf_[0] = '\0'; }

    void put_char(char ch) noexcept {
        if (len_ + 1 >= cap_) {
            truncated_ = true;
            return;
        }
        buf_[len_++] = ch;
        buf_[len_] = '\0';
    }
    void put(const char* s) noexcept {
        while (*s != '\0') put_char(*s++);
    }
    void put_dec(int64_t v) noexcept {
        uint64_t u = static_cast<uint64_t>(v);
        if (v < 0) {
            put_char('-');
            u = 0 - u;
        }
        put_unsigned(u, 1);
    }
    // At least `min_digits` digits, zero-padded.
    void put_unsigned(uint64_t v, int min_digits) noexcept {
        char tmp[24];
        int n = 0;
        do {
            tmp[n++] = static_cast<char>('0' + v % 10);
            v /= 10;
        } while (v != 0 && n < 24);
        while (n < min_digits && n < 24) tmp[n++] = '0';
        while (n > 0) put_char(tmp[--n]);
    }
    // "0x" and the full pointer width in hex digits.
    void put_hex(uintptr_t v) noexcept {
        static const char kDigits[] = "0123456789abcdef";
        put("0x");
        for (int shift = static_cast<int>(sizeof v * 8) - 4; shift >= 0; shift -= 4) {
            put_char(kDigits[(v >> shift) & 0xf]);
        }
    }
    // 20261127T081500Z: sorts by time and is valid in file names on every platform.
    void put_compact_time(const Civil& c) noexcept {
        put_unsigned(static_cast<uint64_t>(c.year), 4);
        put_unsigned(c.month, 2);
        put_unsigned(c.day, 2);
        put_char('T');
        put_unsigned(c.hour, 2);
        put_unsigned(c.minute, 2);
        put_unsigned(c.second, 2);
        put_char('Z');
    }
    // 2026-11-27T08:15:00Z
    void put_iso_time(const Civil& c) noexcept {
        put_unsigned(static_cast<uint64_t>(c.year), 4);
        put_char('-');
        put_unsigned(c.month, 2);
        put_char('-');
        put_unsigned(c.day, 2);
        put_char('T');
        put_unsigned(c.hour, 2);
        put_char(':');
        put_unsigned(c.minute, 2);
        put_char(':');
        put_unsigned(c.second, 2);
        put_char('Z');
    }

    // A report's file name after its directory prefix: "<pid>-<compact time><ext>", and for a
    // `number` of 2 or more (the name was taken) "<pid>-<compact time>-<number><ext>".
    void put_report_name(int64_t pid, const Civil& c, int number, const char* ext) noexcept {
        put_dec(pid);
        put_char('-');
        put_compact_time(c);
        if (number > 1) {
            put_char('-');
            put_dec(number);
        }
        put(ext);
    }

    const char* c_str() const noexcept { return buf_; }
    const char* data() const noexcept { return buf_; }
    size_t size() const noexcept { return len_; }
    bool truncated() const noexcept { return truncated_; }

  private:
    char* buf_;
    size_t cap_;
    size_t len_ = 0;
    bool truncated_ = false;
};

}  // namespace crash_text
}  // namespace iocpnative
