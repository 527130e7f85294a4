// iocpnative-client: the seed's client, built from the core. Sends "No:1", "No:2", ... every
// --interval seconds, prints each reply as "Recv: No:n", and ends after --count messages (or
// never). Same flags as `python -m iocpnative client`; --timeout 0 means no limit here (the
// Python CLI refuses 0).
#include <chrono>
#include <cstdio>
#include <exception>
#include <stdexcept>
#include <string>
#include <thread>

#include "iocpnative/client.hpp"
#include "options.hpp"

namespace {

// As python -m iocpnative client: sleep_for() of inf or 1e300 seconds overflows its conversion to
// clock ticks (undefined behaviour: it returned at once here).
constexpr double kMaxIntervalS = 1e6;

const char kUsage[] =
    "usage: iocpnative-client [--host HOST] [--port PORT] [--interval SECONDS] [--count N]\n"
    "                         [--timeout SECONDS]\n"
    "The seed's client: sends No:1, No:2, ... and prints each reply.\n";

struct Settings {
    std::string host = "127.0.0.1";
    uint16_t port = 6000;
    double interval = 5.0;
    long long count = 0;  // 0: forever
    double timeout = 5.0;
    bool help = false;
};

Settings parse(int argc, char** argv) {
    Settings s;
    iocpnative::tools::Options opt(argc, argv);
    while (opt.next()) {
        const std::string& f = opt.flag();
        if (f == "-h" || f == "--help") {
            s.help = true;
        } else if (f == "--host") {
            s.host = opt.text();
        } else if (f == "--port") {
            s.port = static_cast<uint16_t>(opt.integer(1, 65535));
        } else if (f == "--interval") {
            s.interval = opt.number(0.0, kMaxIntervalS);
        } else if (f == "--count") {
            s.count = opt.integer(1, 1LL << 62);
        } else if (f == "--timeout") {
            s.timeout = opt.number(0.0);
        } else {
            opt.unknown();
        }
    }
    return s;
}

int run(const Settings& s) {
    iocpnative::Client cli(s.host, s.port, s.timeout);
    long long received = 0;
    for (long long n = 1; s.count == 0 || n <= s.count; ++n) {
        const std::string msg = "No:" + std::to_string(n);
        std::string reply(msg.size(), '\0');
        cli.request(msg.data(), msg.size(), &reply[0]);
        ++received;
        std::printf("Recv: %s\n", reply.c_str());
        std::fflush(stdout);
        if (s.count == 0 || n < s.count) {
            std::this_thread::sleep_for(std::chrono::duration<double>(s.interval));
        }
    }
    std::printf("%lld replies received\n", received);
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    return iocpnative::tools::tool_main<Settings>("iocpnative-client", kUsage, argc, argv, parse,
                                                  run);
}
