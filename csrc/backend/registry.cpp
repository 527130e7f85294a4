// Which backends exist here, which are usable now, and which one "auto" means.
//
// io_uring can be compiled in and still be refused at run time (EPERM under Docker's default
// seccomp profile, kernel.io_uring_disabled, an old kernel), so availability is probed, once per
// process, and "auto" takes the best usable backend. IOCPNATIVE_BACKEND overrides "auto".
#include <cstdlib>
#include <mutex>
#include <stdexcept>

#include "backend.hpp"
#include "factories.hpp"

namespace iocpnative {

namespace {

struct Entry {
    const char* name;
    bool compiled;
    std::string (*probe)();
    std::unique_ptr<Backend> (*make)();
};

// Best first.
const Entry kEntries[] = {
#ifdef IOCPNATIVE_HAVE_IOCP
    {"iocp", true, probe_iocp, make_iocp_backend},
#endif  // IOCPNATIVE_HAVE_IOCP
#ifdef IOCPNATIVE_HAVE_URING
    {"io_uring", true, probe_uring, make_uring_backend},
#endif  // IOCPNATIVE_HAVE_URING
#ifdef IOCPNATIVE_HAVE_EPOLL
    {"epoll", true, probe_epoll, make_epoll_backend},
#endif  // IOCPNATIVE_HAVE_EPOLL
};

// Names every platform may know, so an error can say "not built into this binary".
const char* const kKnown[] = {"iocp", "io_uring", "epoll"};

const std::vector<BackendStatus>& cached_statuses() {
    static std::once_flag once;
    static std::vector<BackendStatus> statuses;
    std::call_once(once, [] {
        for (const char* known : kKnown) {
            BackendStatus st;
            st.name = known;
            st.reason = "not built into this binary (not supported on this platform)";
            for (const Entry& e : kEntries) {
                if (st.name != e.name) continue;
                st.compiled = true;
                try {
                    st.reason = e.probe();
                } catch (const std::exception& ex) {
                    st.reason = ex.what();
                }
                st.available = st.reason.empty();
            }
            statuses.push_back(st);
        }
    });
    return statuses;
}

std::string join(const std::vector<std::string>& v) {
    std::string out;
    for (const auto& s : v) out += (out.empty() ? "" : ", ") + ("'" + s + "'");
    return out;
}

}  // namespace

std::vector<BackendStatus> backend_statuses() {
    std::vector<BackendStatus> out;
    // Compiled backends in preference order, then the ones this build lacks.
    for (const Entry& e : kEntries) {
        for (const auto& st : cached_statuses()) {
            if (st.name == e.name) out.push_back(st);
        }
    }
    for (const auto& st : cached_statuses()) {
        if (!st.compiled) out.push_back(st);
    }
    return out;
}

std::vector<std::string> available_backends() {
    std::vector<std::string> out;
    for (const auto& st : backend_statuses()) {
        if (st.available) out.push_back(st.name);
    }
    return out;
}

std::string resolve_backend(const std::string& requested) {
    std::string want = requested;
    if (want == "auto") {
        const char* env = std::getenv("IOCPNATIVE_BACKEND");
        if (env != nullptr && *env != '\0' && std::string(env) != "auto") want = env;
    }
    const auto avail = available_backends();
    if (want == "auto") {
        if (avail.empty()) throw std::invalid_argument("no backend is usable on this machine");
        return avail.front();
    }
    for (const auto& st : backend_statuses()) {
        if (st.name != want) continue;
        if (st.available) return want;
        throw std::invalid_argument("backend '" + want + "' is not available here (" + st.reason +
                                    "); available: " + join(avail) + " or 'auto'");
    }
    throw std::invalid_argument("unknown backend '" + want + "'" +
                                (requested == "auto" ? " (from IOCPNATIVE_BACKEND)" : "") +
                                "; expected 'auto', 'iocp', 'io_uring' or 'epoll' (available "
                                "here: " +
                                join(avail) + ")");
}

std::unique_ptr<Backend> create_backend(const std::string& name) {
    for (const Entry& e : kEntries) {
        if (name == e.name) return e.make();
    }
    throw std::invalid_argument("unknown backend '" + name + "'");
}

}  // namespace iocpnative
