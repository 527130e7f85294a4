// iocpnative._native.run_load: the native load generator (csrc/client/loadgen.hpp). The GIL is
// released while the load runs; the progress callback takes it briefly, once per second, and
// also lets Ctrl-C (a pending signal) stop the run.
#include <memory>

#include "bindings.hpp"
#include "client/loadgen.hpp"

namespace iocpnative {
namespace bindings {

namespace {

py::dict progress_dict(const LoadProgress& p) {
    py::dict d;
    d["phase"] = p.phase;
    d["elapsed_s"] = p.elapsed_s;
    d["round_trips"] = p.round_trips;
    d["recent_per_s"] = p.recent_per_s;
    d["errors"] = p.errors;
    d["open_connections"] = p.open_connections;
    return d;
}

py::dict result_dict(const LoadResult& r) {
    py::dict d;
    d["round_trips"] = r.round_trips;
    d["window_s"] = r.window_s;
    d["requests_per_s"] = r.requests_per_s;
    d["mb_per_s"] = r.mb_per_s;
    d["p50_us"] = r.p50_us;
    d["p90_us"] = r.p90_us;
    d["p99_us"] = r.p99_us;
    d["p999_us"] = r.p999_us;
    d["max_us"] = r.max_us;
    d["mean_us"] = r.mean_us;
    py::dict kinds;
    for (int k = 0; k < kLoadErrorKinds; ++k) {
        kinds[load_error_name(static_cast<LoadError>(k))] = r.error_counts[static_cast<size_t>(k)];
    }
    d["error_kinds"] = kinds;
    d["errors"] = r.errors;
    d["connections_open"] = r.connections_open;
    d["connect_s"] = r.connect_s;
    d["rate_target"] = r.rate_target;
    d["client_cpu_s"] = r.client_cpu_s;
    d["first_error"] = r.first_error;
    return d;
}

}  // namespace

void register_bench(py::module_& m) {
    m.def(
        "run_load",
        [](const std::string& host, int port, int connections, size_t size, double duration,
           double warmup, double rate, int threads, int pipeline, double connect_timeout,
           double stall_timeout, const py::object& progress) {
            if (port < 1 || port > 65535) {
                throw std::invalid_argument("port must be in 1..65535, got " +
                                            std::to_string(port));
            }
            LoadConfig cfg;
            cfg.host = host;
            cfg.port = static_cast<uint16_t>(port);
            cfg.connections = connections;
            cfg.size = size;
            cfg.duration_s = duration;
            cfg.warmup_s = warmup;
            cfg.rate = rate;
            cfg.threads = threads;
            cfg.pipeline = pipeline;
            cfg.connect_timeout_s = connect_timeout;
            cfg.stall_timeout_s = stall_timeout;
            validate(cfg);  // ValueError while the GIL is still held
            std::unique_ptr<py::error_already_set> pending;
            LoadProgressFn fn = [&](const LoadProgress& p) {
                py::gil_scoped_acquire gil;
                try {
                    if (PyErr_CheckSignals() != 0) throw py::error_already_set();
                    if (!progress.is_none()) progress(progress_dict(p));
                } catch (py::error_already_set& e) {
                    pending = std::make_unique<py::error_already_set>(std::move(e));
                    return false;
                }
                return true;
            };
            LoadResult r;
            {
                py::gil_scoped_release nogil;
                r = run_load(cfg, fn);
            }
            if (pending) throw std::move(*pending);
            return result_dict(r);
        },
        py::arg("host"), py::arg("port"), py::arg("connections"), py::arg("size"),
        py::arg("duration"), py::arg("warmup"), py::arg("rate"), py::arg("threads"),
        py::arg("pipeline"), py::arg("connect_timeout"), py::arg("stall_timeout"),
        py::arg("progress"),
        "Runs the native load generator against an echo server; returns the result as a dict.");
}

}  // namespace bindings
}  // namespace iocpnative
