// Python handlers: a DataHandler that calls Python callables from the native worker threads.
//
// The GIL is taken only around the calls: once per completion batch for the data handler (the
// worker hands over every chunk of one wait() batch in on_batch), once per call for on_connect
// and on_disconnect. Between batches the worker waits for I/O without it.
//
// Each worker thread keeps one Python thread state for its whole life (WorkerThreadState below):
// creating and deleting one per batch would cost more than a small handler call.
//
// Interpreter shutdown: once Python is finalizing, a thread that tries to take the GIL is stopped
// for good inside the attempt, which would leave the worker (and stop()) hanging. So nothing here
// calls into Python after Py_IsFinalizing(); the data is then left unhandled and the connection
// closed. iocpnative._server stops running servers with handlers at exit, before finalization.
#include <atomic>
#include <cstring>
#include <memory>
#include <string>

#include "bindings.hpp"
#include "iocpnative/server.hpp"

namespace iocpnative {
namespace bindings {

namespace {

bool interpreter_finalizing() noexcept {
#if PY_VERSION_HEX >= 0x030D0000
    return Py_IsFinalizing() != 0;
#else
    return _Py_IsFinalizing() != 0;
#endif  // PY_VERSION_HEX >= 0x030D0000
}

// A worker thread's Python thread state: made by the first acquire (PyGILState_Ensure, so that
// code called from the handler that uses the PyGILState API finds it), kept while the thread
// runs, given back when the thread exits.
class WorkerThreadState {
  public:
    WorkerThreadState() = default;
    WorkerThreadState(const WorkerThreadState&) = delete;
    WorkerThreadState& operator=(const WorkerThreadState&) = delete;
    ~WorkerThreadState() {
        if (tstate_ == nullptr || interpreter_finalizing()) return;
        PyEval_RestoreThread(tstate_);
        PyGILState_Release(gilstate_);
    }
    void acquire() {
        if (tstate_ == nullptr) {
            gilstate_ = PyGILState_Ensure();
            tstate_ = PyThreadState_Get();
        } else {
            PyEval_RestoreThread(tstate_);
        }
    }
    void release() { PyEval_SaveThread(); }

  private:
    PyThreadState* tstate_ = nullptr;
    PyGILState_STATE gilstate_ = PyGILState_UNLOCKED;
};

thread_local WorkerThreadState t_worker_state;

// Holds the GIL for one scope on a worker thread.
class WorkerGil {
  public:
    WorkerGil() { t_worker_state.acquire(); }
    ~WorkerGil() { t_worker_state.release(); }
    WorkerGil(const WorkerGil&) = delete;
    WorkerGil& operator=(const WorkerGil&) = delete;
};

// The exception being raised, normalised and with its traceback attached, as a new reference;
// clears the error indicator.
PyObject* take_exception() {
#if PY_VERSION_HEX >= 0x030C0000
    return PyErr_GetRaisedException();
#else
    PyObject *type = nullptr, *value = nullptr, *tb = nullptr;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != nullptr && value != nullptr) PyException_SetTraceback(value, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    return value;
#endif  // PY_VERSION_HEX >= 0x030C0000
}

// Copies a bytes-like reply into `out`: the only copy between the Python object and the
// reply string the worker sends. None means no reply. Sets TypeError for anything else.
bool copy_reply(PyObject* r, std::string& out) {
    if (r == Py_None) return true;
    if (PyBytes_CheckExact(r)) {
        out.assign(PyBytes_AS_STRING(r), static_cast<size_t>(PyBytes_GET_SIZE(r)));
        return true;
    }
    if (PyByteArray_CheckExact(r)) {
        out.assign(PyByteArray_AS_STRING(r), static_cast<size_t>(PyByteArray_GET_SIZE(r)));
        return true;
    }
    if (!PyObject_CheckBuffer(r)) {
        PyErr_Format(PyExc_TypeError,
                     "handler must return bytes, bytearray, memoryview or None, not %.200s",
                     Py_TYPE(r)->tp_name);
        return false;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(r, &view, PyBUF_FULL_RO) != 0) return false;
    const size_t n = static_cast<size_t>(view.len);
    bool ok = true;
    if (PyBuffer_IsContiguous(&view, 'C')) {
        out.assign(static_cast<const char*>(view.buf), n);
    } else {
        out.resize(n);  // a strided memoryview: gathered in C order
        ok = PyBuffer_ToContiguous(&out[0], &view, view.len, 'C') == 0;
    }
    PyBuffer_Release(&view);
    return ok;
}

// The callables a Python Server gave, called from the workers.
class PyDataHandler final : public DataHandler {
  public:
    // `report(where, conn_id, exc)` logs an exception raised by a callback (Python decides how:
    // logging.getLogger("iocpnative") with the traceback). Called with the GIL held.
    PyDataHandler(py::object fn, bool pass_conn_id, py::object on_connect, py::object on_disconnect,
                  py::object report)
        : fn_(std::move(fn)),
          on_connect_(std::move(on_connect)),
          on_disconnect_(std::move(on_disconnect)),
          report_(std::move(report)),
          pass_conn_id_(pass_conn_id) {}

    // The last reference may go on a worker thread (the threads keep the core alive after a
    // stop() timeout) or after Python has begun finalizing: drop the callables accordingly.
    ~PyDataHandler() override {
        if (interpreter_finalizing()) {
            for (py::object* o : {&fn_, &on_connect_, &on_disconnect_, &report_}) o->release();
            return;
        }
        const PyGILState_STATE st = PyGILState_Ensure();
        for (py::object* o : {&fn_, &on_connect_, &on_disconnect_, &report_}) *o = py::object();
        PyGILState_Release(st);
    }

    bool on_data(uint64_t conn_id, const char* data, size_t len, std::string& out) override {
        if (interpreter_finalizing()) return false;
        WorkerGil gil;
        return call_handler(conn_id, data, len, out);
    }

    void on_batch(DataChunk* chunks, size_t n, const std::atomic<bool>& stopping) override {
        if (interpreter_finalizing()) return;  // unhandled: the connections get closed
        WorkerGil gil;
        for (size_t i = 0; i < n && !stopping.load(std::memory_order_relaxed); ++i) {
            DataChunk& ch = chunks[i];
            ch.ok = call_handler(ch.conn_id, ch.data, ch.len, ch.out);
            ch.handled = true;
        }
    }

    bool on_connect(uint64_t conn_id, const std::string& peer) override {
        if (on_connect_.is_none() || interpreter_finalizing()) return true;
        WorkerGil gil;
        PyObject* id = PyLong_FromUnsignedLongLong(conn_id);
        PyObject* p =
            id ? PyUnicode_DecodeUTF8(peer.data(), static_cast<Py_ssize_t>(peer.size()), "replace")
               : nullptr;
        PyObject* r = nullptr;
        if (p != nullptr) {
            PyObject* args[] = {id, p};
            r = PyObject_Vectorcall(on_connect_.ptr(), args, 2, nullptr);
        }
        Py_XDECREF(p);
        Py_XDECREF(id);
        return finish_call(r, "on_connect", conn_id);
    }

    bool on_disconnect(uint64_t conn_id) override {
        if (on_disconnect_.is_none() || interpreter_finalizing()) return true;
        WorkerGil gil;
        PyObject* id = PyLong_FromUnsignedLongLong(conn_id);
        PyObject* r = id ? PyObject_CallOneArg(on_disconnect_.ptr(), id) : nullptr;
        Py_XDECREF(id);
        return finish_call(r, "on_disconnect", conn_id);
    }

  private:
    // With the GIL held: fn(data) or fn(conn_id, data), its reply copied into `out`.
    bool call_handler(uint64_t conn_id, const char* data, size_t len, std::string& out) {
        PyObject* b = PyBytes_FromStringAndSize(data, static_cast<Py_ssize_t>(len));
        PyObject* r = nullptr;
        if (b != nullptr && pass_conn_id_) {
            PyObject* id = PyLong_FromUnsignedLongLong(conn_id);
            if (id != nullptr) {
                PyObject* args[] = {id, b};
                r = PyObject_Vectorcall(fn_.ptr(), args, 2, nullptr);
                Py_DECREF(id);
            }
        } else if (b != nullptr) {
            r = PyObject_CallOneArg(fn_.ptr(), b);
        }
        Py_XDECREF(b);
        if (r == nullptr) return report("handler", conn_id);
        const bool ok = copy_reply(r, out);
        Py_DECREF(r);
        if (!ok) {
            out.clear();
            return report("handler", conn_id);
        }
        return true;
    }

    // Steals the call's result; false (after reporting) when the call raised.
    bool finish_call(PyObject* result, const char* where, uint64_t conn_id) {
        if (result == nullptr) return report(where, conn_id);
        Py_DECREF(result);
        return true;
    }

    // Hands the pending exception to `report`; always returns false. An exception raised by
    // report itself goes to sys.unraisablehook rather than being lost silently.
    bool report(const char* where, uint64_t conn_id) {
        PyObject* exc = take_exception();
        if (exc == nullptr) return false;
        PyObject* r = PyObject_CallFunction(report_.ptr(), "sKO", where,
                                            static_cast<unsigned long long>(conn_id), exc);
        if (r == nullptr) PyErr_WriteUnraisable(report_.ptr());
        Py_XDECREF(r);
        Py_DECREF(exc);
        return false;
    }

    py::object fn_;
    py::object on_connect_;
    py::object on_disconnect_;
    py::object report_;
    const bool pass_conn_id_;
};

}  // namespace

std::shared_ptr<DataHandler> as_data_handler(const py::handle& h) {
    if (h.is_none()) return nullptr;
    return h.cast<std::shared_ptr<PyDataHandler>>();
}

void register_handler(py::module_& m) {
    py::class_<PyDataHandler, std::shared_ptr<PyDataHandler>>(
        m, "Handler",
        "Python callables for a Server: fn(data) or fn(conn_id, data) -> bytes-like or None, "
        "on_connect(conn_id, peer), on_disconnect(conn_id); report(where, conn_id, exc) logs "
        "their exceptions.")
        .def(py::init<py::object, bool, py::object, py::object, py::object>(), py::arg("fn"),
             py::arg("pass_conn_id"), py::arg("on_connect"), py::arg("on_disconnect"),
             py::arg("report"));
}

}  // namespace bindings
}  // namespace iocpnative
