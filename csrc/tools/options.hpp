// Command-line parsing shared by the native tools: `--name value` or `--name=value`, numbers
// range-checked, errors as std::invalid_argument with the flag's name (the tools print it and
// exit 2, as the Python CLI does for a ValueError).
#pragma once

#include <cerrno>
#include <cstdio>
#include <exception>
#include <cstdlib>
#include <stdexcept>
#include <string>

namespace iocpnative {
namespace tools {

class Options {
  public:
    Options(int argc, char** argv) : argc_(argc), argv_(argv) {}

    // Advances to the next argument; false at the end.
    bool next() {
        if (++index_ >= argc_) return false;
        const std::string arg = argv_[index_];
        const size_t eq = arg.find('=');
        if (arg.rfind("--", 0) == 0 && eq != std::string::npos) {
            flag_ = arg.substr(0, eq);
            inline_value_ = arg.substr(eq + 1);
            has_inline_ = true;
        } else {
            flag_ = arg;
            has_inline_ = false;
        }
        return true;
    }

    const std::string& flag() const { return flag_; }

    std::string text() {
        if (has_inline_) return inline_value_;
        if (index_ + 1 >= argc_) throw std::invalid_argument(flag_ + " needs a value");
        return argv_[++index_];
    }

    long long integer(long long lo, long long hi) {
        const std::string v = text();
        char* end = nullptr;
        errno = 0;
        const long long n = std::strtoll(v.c_str(), &end, 10);
        if (v.empty() || *end != '\0' || errno != 0 || n < lo || n > hi) {
            throw std::invalid_argument(flag_ + " must be an integer between " +
                                        std::to_string(lo) + " and " + std::to_string(hi) +
                                        ", got '" + v + "'");
        }
        return n;
    }

    double number(double lo) {
        const std::string v = text();
        char* end = nullptr;
        errno = 0;
        const double x = std::strtod(v.c_str(), &end);
        if (v.empty() || *end != '\0' || errno != 0 || !(x >= lo)) {
            throw std::invalid_argument(flag_ + " must be a number >= " + std::to_string(lo) +
                                        ", got '" + v + "'");
        }
        return x;
    }

    // A number in lo..hi: a bound for values that become a sleep, whose duration conversion
    // would overflow (undefined behaviour) for inf or a huge number.
    double number(double lo, double hi) {
        const std::string v = text();
        char* end = nullptr;
        errno = 0;
        const double x = std::strtod(v.c_str(), &end);
        if (v.empty() || *end != '\0' || errno != 0 || !(x >= lo && x <= hi)) {
            char range[64];
            std::snprintf(range, sizeof(range), "between %g and %g", lo, hi);
            throw std::invalid_argument(flag_ + " must be a number " + range + ", got '" + v + "'");
        }
        return x;
    }

    [[noreturn]] void unknown() const {
        throw std::invalid_argument("unknown argument '" + flag_ + "' (see --help)");
    }

  private:
    int argc_;
    char** argv_;
    int index_ = 0;
    std::string flag_;
    std::string inline_value_;
    bool has_inline_ = false;
};

constexpr int kExitError = 1;
constexpr int kExitUsage = 2;

// The tools' main(): parse, print usage on --help, run; errors become one line on stderr and
// exit code 2 (bad values) or 1 (anything else), as the Python CLI does.
template <class Settings, class Parse, class Run>
int tool_main(const char* name, const char* usage, int argc, char** argv, Parse parse, Run run) {
    Settings s;
    try {
        s = parse(argc, argv);
    } catch (const std::invalid_argument& e) {
        std::fprintf(stderr, "%s%s: error: %s\n", usage, name, e.what());
        return kExitUsage;
    }
    if (s.help) {
        std::fputs(usage, stdout);
        return 0;
    }
    try {
        return run(s);
    } catch (const std::invalid_argument& e) {
        std::fprintf(stderr, "%s: error: %s\n", name, e.what());
        return kExitUsage;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "%s: error: %s\n", name, e.what());
        return kExitError;
    }
}

}  // namespace tools
}  // namespace iocpnative
