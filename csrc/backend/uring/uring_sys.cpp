// io_uring ring setup, submission and completion through raw system calls. Linux >= 5.11; see
// uring_sys.hpp for the memory-ordering rules this file implements.
#include "uring_sys.hpp"

#include <errno.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "iocpnative/errors.hpp"

// glibc < 2.30 lacks the numbers; they are the same on every architecture (asm-generic).
#ifndef __NR_io_uring_setup
#define __NR_io_uring_setup 425
#endif  // __NR_io_uring_setup
#ifndef __NR_io_uring_enter
#define __NR_io_uring_enter 426
#endif  // __NR_io_uring_enter
#ifndef __NR_io_uring_register
#define __NR_io_uring_register 427
#endif  // __NR_io_uring_register

namespace iocpnative {
namespace uring {

namespace {

// The general timeout of a batch wait when the caller asked for none (see Ring::enter).
constexpr long long kNoTimeoutSeconds = 3600;

int sys_setup(unsigned entries, io_uring_params* p) {
    return static_cast<int>(::syscall(__NR_io_uring_setup, entries, p));
}

int sys_enter(int fd, unsigned to_submit, unsigned min_complete, unsigned flags, const void* arg,
              size_t argsz) {
    return static_cast<int>(
        ::syscall(__NR_io_uring_enter, fd, to_submit, min_complete, flags, arg, argsz));
}

int sys_register(int fd, unsigned opcode, const void* arg, unsigned nr_args) {
    return static_cast<int>(::syscall(__NR_io_uring_register, fd, opcode, arg, nr_args));
}

template <class T>
T load_acquire(const T* p) noexcept {
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}

template <class T>
void store_release(T* p, T v) noexcept {
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}

template <class T>
T* at(void* base, uint32_t off) noexcept {
    return reinterpret_cast<T*>(static_cast<char*>(base) + off);
}

bool env_set(const char* name) {
    const char* v = std::getenv(name);
    return v != nullptr && *v != '\0' && std::strcmp(v, "0") != 0;
}

// Why EPERM: the sysctl (Linux >= 6.6) says so, or else a seccomp filter refused the call.
std::string eperm_reason() {
    std::ifstream f("/proc/sys/kernel/io_uring_disabled");
    int level = 0;
    if (f >> level) {
        if (level == 2) return "io_uring is disabled by sysctl kernel.io_uring_disabled=2";
        if (level == 1) {
            return "io_uring is restricted by sysctl kernel.io_uring_disabled=1 and this process "
                   "is not in kernel.io_uring_group";
        }
    }
    return "io_uring_setup was refused with EPERM (a seccomp filter, e.g. Docker's default "
           "profile, blocks io_uring)";
}

// The opcodes the backend cannot do without, each with its kernel.
struct RequiredOp {
    unsigned op;
    const char* name;
};
const RequiredOp kRequiredOps[] = {
    {IORING_OP_ACCEPT, "ACCEPT (5.5)"},
    {IORING_OP_RECV, "RECV (5.6)"},
    {IORING_OP_SEND, "SEND (5.6)"},
    {IORING_OP_READ, "READ (5.6)"},
    {IORING_OP_ASYNC_CANCEL, "ASYNC_CANCEL (5.5)"},
};

std::string check_opcodes(int fd) {
    constexpr unsigned kOps = 256;
    const size_t bytes = sizeof(io_uring_probe) + kOps * sizeof(io_uring_probe_op);
    std::unique_ptr<char[]> mem(new char[bytes]());
    auto* probe = reinterpret_cast<io_uring_probe*>(mem.get());
    if (sys_register(fd, IORING_REGISTER_PROBE, probe, kOps) < 0) {
        return make_system_error(errno, "io_uring_register(IORING_REGISTER_PROBE)").what();
    }
    for (const RequiredOp& r : kRequiredOps) {
        if (r.op > probe->last_op || !(probe->ops[r.op].flags & IO_URING_OP_SUPPORTED)) {
            return std::string("the kernel's io_uring lacks IORING_OP_") + r.name;
        }
    }
    return "";
}

}  // namespace

// io_uring_getevents_arg as Linux 6.12 defines it: older headers call min_wait_usec `pad` (and
// older kernels require it to be 0, which has_min_wait() guarantees).
struct GetEventsArg {
    uint64_t sigmask;
    uint32_t sigmask_sz;
    uint32_t min_wait_usec;
    uint64_t ts;
};
static_assert(sizeof(GetEventsArg) == sizeof(io_uring_getevents_arg), "io_uring ABI");

bool kernel_at_least(int major, int minor) noexcept {
    struct utsname u;
    if (::uname(&u) != 0) return false;
    int have_major = 0;
    int have_minor = 0;
    if (std::sscanf(u.release, "%d.%d", &have_major, &have_minor) != 2) return false;
    return have_major > major || (have_major == major && have_minor >= minor);
}

Features features_from_env() {
    Features f;
    const char* v = std::getenv("IOCPNATIVE_URING_DISABLE");
    if (v == nullptr) return f;
    // A comma list, spaces and case ignored; a name we do not know is reported once per process
    // (a typo would otherwise leave the feature on without a word).
    static const struct {
        const char* name;
        bool Features::* field;
    } kSwitches[] = {
        {"defer_taskrun", &Features::defer_taskrun},
        {"single_issuer", &Features::single_issuer},
        {"coop_taskrun", &Features::coop_taskrun},
        {"submit_all", &Features::submit_all},
        {"multishot_accept", &Features::multishot_accept},
        {"pbuf_ring", &Features::pbuf_ring},
        {"multishot_recv", &Features::multishot_recv},
        {"min_wait", &Features::min_wait},
        {"poll", &Features::poll},
    };
    std::vector<std::string> names;
    std::string cur;
    for (const char* p = v;; ++p) {
        if (*p == ',' || *p == '\0') {
            if (!cur.empty()) names.push_back(cur);
            cur.clear();
            if (*p == '\0') break;
        } else if (!std::isspace(static_cast<unsigned char>(*p))) {
            cur += static_cast<char>(std::tolower(static_cast<unsigned char>(*p)));
        }
    }
    static std::atomic<bool> warned{false};
    for (const std::string& n : names) {
        const bool all = n == "all";
        bool known = all;
        for (const auto& sw : kSwitches) {
            if (all || n == sw.name) {
                f.*sw.field = false;
                known = true;
            }
        }
        if (!known && !warned.exchange(true)) {
            std::string list = "all";
            for (const auto& sw : kSwitches) list += std::string(", ") + sw.name;
            std::fprintf(stderr,
                         "iocpnative: IOCPNATIVE_URING_DISABLE: unknown name '%s' ignored (known: "
                         "%s)\n",
                         n.c_str(), list.c_str());
        }
    }
    return f;
}

std::string probe() {
    // Test hook: makes the probe fail on purpose so the epoll fallback can be tested on a machine
    // whose kernel has io_uring (the registry caches the answer, so tests use a subprocess).
    if (env_set("IOCPNATIVE_DISABLE_IO_URING")) return "disabled by IOCPNATIVE_DISABLE_IO_URING";
    io_uring_params p{};
    const int fd = sys_setup(4, &p);
    if (fd < 0) {
        const int err = errno;
        if (err == ENOSYS) return "the kernel has no io_uring (ENOSYS); Linux >= 5.11 is needed";
        if (err == EPERM) return eperm_reason();
        return make_system_error(err, "io_uring_setup").what();
    }
    std::string reason;
    if (!(p.features & IORING_FEAT_EXT_ARG)) {
        reason = "the kernel's io_uring lacks IORING_FEAT_EXT_ARG (Linux >= 5.11 is needed)";
    } else {
        reason = check_opcodes(fd);
    }
    ::close(fd);
    return reason;
}

// --- Ring ------------------------------------------------------------------------------------

Ring::Ring(unsigned sq_entries, unsigned cq_entries, const Features& feat) {
    // Best first. DEFER_TASKRUN (6.1) runs completion work only when we wait, on our thread, and
    // needs SINGLE_ISSUER (6.0), which lets the kernel skip locking; COOP_TASKRUN (5.19) at least
    // stops completions from interrupting us with IPIs. SUBMIT_ALL (5.18) keeps submitting past
    // an SQE that fails early. An older kernel answers EINVAL to a flag it does not know.
    const uint32_t all = feat.submit_all ? IORING_SETUP_SUBMIT_ALL : 0;
    std::vector<uint32_t> ladder;
    if (feat.single_issuer && feat.defer_taskrun) {
        ladder.push_back(IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | all);
    }
    if (feat.single_issuer && feat.coop_taskrun) {
        ladder.push_back(IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_COOP_TASKRUN | all);
    }
    if (feat.coop_taskrun) ladder.push_back(IORING_SETUP_COOP_TASKRUN | all);
    if (all != 0) ladder.push_back(all);
    ladder.push_back(0);

    io_uring_params p{};
    int err = EINVAL;
    for (uint32_t extra : ladder) {
        p = io_uring_params{};
        // R_DISABLED (5.10): the ring is built on the thread that starts the server, but a
        // SINGLE_ISSUER ring belongs to the task that first submits or enables it; enable()
        // runs on the worker thread.
        p.flags = IORING_SETUP_R_DISABLED | IORING_SETUP_CQSIZE | extra;
        p.cq_entries = cq_entries;
        fd_ = sys_setup(sq_entries, &p);
        if (fd_ >= 0) break;
        err = errno;
        if (err != EINVAL) break;
    }
    if (fd_ < 0) throw make_system_error(err, "io_uring_setup");
    flags_ = p.flags;
    features_ = p.features;
    if (!feat.min_wait) features_ &= ~kFeatMinTimeout;
    if (!(features_ & IORING_FEAT_EXT_ARG)) {
        ::close(fd_);
        throw make_system_error(ENOSYS, "io_uring without IORING_FEAT_EXT_ARG (Linux < 5.11)");
    }
    try {
        map_rings(p);
    } catch (...) {
        unmap();
        ::close(fd_);
        throw;
    }
}

Ring::~Ring() {
    unmap();
    if (fd_ >= 0) ::close(fd_);
}

void Ring::map_rings(const io_uring_params& p) {
    sq_ring_size_ = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    cq_ring_size_ = p.cq_off.cqes + p.cq_entries * sizeof(io_uring_cqe);
    const bool single = (p.features & IORING_FEAT_SINGLE_MMAP) != 0;  // Linux >= 5.4
    if (single) sq_ring_size_ = cq_ring_size_ = std::max(sq_ring_size_, cq_ring_size_);
    void* sq = ::mmap(nullptr, sq_ring_size_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                      fd_, IORING_OFF_SQ_RING);
    if (sq == MAP_FAILED) throw make_system_error(errno, "mmap(io_uring SQ ring)");
    sq_ring_ = sq;
    if (single) {
        cq_ring_ = sq_ring_;
    } else {
        void* cq = ::mmap(nullptr, cq_ring_size_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                          fd_, IORING_OFF_CQ_RING);
        if (cq == MAP_FAILED) throw make_system_error(errno, "mmap(io_uring CQ ring)");
        cq_ring_ = cq;
    }
    sqes_size_ = p.sq_entries * sizeof(io_uring_sqe);
    void* sqes = ::mmap(nullptr, sqes_size_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd_,
                        IORING_OFF_SQES);
    if (sqes == MAP_FAILED) throw make_system_error(errno, "mmap(io_uring SQEs)");
    sqes_ = static_cast<io_uring_sqe*>(sqes);

    sq_khead_ = at<unsigned>(sq_ring_, p.sq_off.head);
    sq_ktail_ = at<unsigned>(sq_ring_, p.sq_off.tail);
    sq_mask_ = *at<unsigned>(sq_ring_, p.sq_off.ring_mask);
    sq_entries_ = *at<unsigned>(sq_ring_, p.sq_off.ring_entries);
    sqe_tail_ = *sq_ktail_;
    // Slot i of the indirection array always names SQE i: SQEs are used in ring order.
    unsigned* array = at<unsigned>(sq_ring_, p.sq_off.array);
    for (unsigned i = 0; i < sq_entries_; ++i) array[i] = i;

    cq_khead_ = at<unsigned>(cq_ring_, p.cq_off.head);
    cq_ktail_ = at<unsigned>(cq_ring_, p.cq_off.tail);
    cq_mask_ = *at<unsigned>(cq_ring_, p.cq_off.ring_mask);
    cqes_ = at<io_uring_cqe>(cq_ring_, p.cq_off.cqes);
}

void Ring::unmap() noexcept {
    if (sqes_ != nullptr) ::munmap(sqes_, sqes_size_);
    if (cq_ring_ != nullptr && cq_ring_ != sq_ring_) ::munmap(cq_ring_, cq_ring_size_);
    if (sq_ring_ != nullptr) ::munmap(sq_ring_, sq_ring_size_);
    sqes_ = nullptr;
    cq_ring_ = sq_ring_ = nullptr;
}

void Ring::enable() {
    if (enabled_) return;
    if (sys_register(fd_, IORING_REGISTER_ENABLE_RINGS, nullptr, 0) < 0) {
        throw make_system_error(errno, "io_uring_register(IORING_REGISTER_ENABLE_RINGS)");
    }
    enabled_ = true;
}

io_uring_sqe* Ring::get_sqe() noexcept {
    // Acquire: the kernel has finished reading every SQE below its head before we reuse one.
    const unsigned head = load_acquire(sq_khead_);
    if (sqe_tail_ - head >= sq_entries_) return nullptr;
    io_uring_sqe* sqe = &sqes_[sqe_tail_ & sq_mask_];
    std::memset(sqe, 0, sizeof(*sqe));
    ++sqe_tail_;
    return sqe;
}

unsigned Ring::unsubmitted() const noexcept {
    return sqe_tail_ - load_acquire(sq_khead_);
}

unsigned Ring::sq_space() const noexcept {
    return sq_entries_ - unsubmitted();
}

int Ring::enter(unsigned wait_nr, int timeout_ms, unsigned min_wait_us) {
    __kernel_timespec ts{};
    const bool min_wait = wait_nr > 1 && has_min_wait() && min_wait_us > 0;
    if (wait_nr > 0 && timeout_ms >= 0) {
        ts.tv_sec = timeout_ms / 1000;
        ts.tv_nsec = static_cast<long long>(timeout_ms % 1000) * 1000000;
        return enter_with(wait_nr, &ts, min_wait ? min_wait_us : 0);
    }
    if (min_wait) {
        // A batch wait needs a general timeout: without one, the kernel ends the whole wait when
        // the batch timeout expires, CQEs or not, so an idle worker with many recvs posted woke
        // every min_wait_us (about 4,000 empty wake-ups a second at 200 us). With one, it waits
        // on for the first CQE. An hour is "no timeout" here; if it passes, the caller sees ETIME.
        ts.tv_sec = kNoTimeoutSeconds;
        return enter_with(wait_nr, &ts, min_wait_us);
    }
    return enter_with(wait_nr, nullptr, 0);
}

int Ring::enter_window(unsigned wait_nr, unsigned window_us) {
    __kernel_timespec ts{};
    ts.tv_sec = window_us / 1000000;
    ts.tv_nsec = static_cast<long long>(window_us % 1000000) * 1000;
    return enter_with(wait_nr, &ts, 0);
}

int Ring::enter_with(unsigned wait_nr, const __kernel_timespec* ts, unsigned min_wait_us) {
    // Release: every SQE written before this store is visible to the kernel, which loads the
    // tail with acquire (the syscall alone would order it without SQPOLL; the pairing is what
    // the ABI documents and what an SQPOLL thread would need).
    store_release(sq_ktail_, sqe_tail_);
    const unsigned to_submit = unsubmitted();
    GetEventsArg arg{};
    arg.sigmask = 0;
    arg.sigmask_sz = _NSIG / 8;
    arg.ts = reinterpret_cast<uint64_t>(ts);
    arg.min_wait_usec = min_wait_us;
    const unsigned flags = IORING_ENTER_GETEVENTS | IORING_ENTER_EXT_ARG;
    if (sys_enter(fd_, to_submit, wait_nr, flags, &arg, sizeof(arg)) >= 0) return 0;
    const int err = errno;
    // ETIME: the wait timed out. EINTR: a signal. EAGAIN/EBUSY: the kernel could not take more
    // SQEs right now (no memory, or CQEs overflowed): reap, then submit again on the next call.
    if (err == ETIME || err == EINTR || err == EAGAIN || err == EBUSY) return -err;
    throw make_system_error(err, "io_uring_enter");
}

unsigned Ring::ready() const noexcept {
    // Acquire: the CQEs below the tail are fully written before we read them.
    return load_acquire(cq_ktail_) - *cq_khead_;
}

const io_uring_cqe& Ring::cqe(unsigned i) const noexcept {
    return cqes_[(*cq_khead_ + i) & cq_mask_];
}

void Ring::consume(unsigned n) noexcept {
    // Release: our reads of the consumed CQEs happen before the kernel may overwrite them.
    store_release(cq_khead_, *cq_khead_ + n);
}

int Ring::do_register(unsigned opcode, const void* arg, unsigned nr_args) noexcept {
    return sys_register(fd_, opcode, arg, nr_args) < 0 ? -errno : 0;
}

std::string Ring::describe_flags() const {
    std::string s;
    auto add = [&](uint32_t bit, const char* name) {
        if (flags_ & bit) s += (s.empty() ? "" : " ") + std::string(name);
    };
    add(IORING_SETUP_SINGLE_ISSUER, "single_issuer");
    add(IORING_SETUP_DEFER_TASKRUN, "defer_taskrun");
    add(IORING_SETUP_COOP_TASKRUN, "coop_taskrun");
    add(IORING_SETUP_SUBMIT_ALL, "submit_all");
    return s.empty() ? "none" : s;
}

// --- BufferRing ------------------------------------------------------------------------------

BufferRing::~BufferRing() {
    release();
}

int BufferRing::setup(Ring& ring, uint16_t group, unsigned count, unsigned capacity,
                      unsigned size) {
    const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
    array_bytes_ = (capacity * sizeof(io_uring_buf) + page - 1) / page * page;
    void* mem =
        ::mmap(nullptr, array_bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) return -errno;
    // Large enough that malloc maps it: pages are only backed once touched.
    data_ = static_cast<char*>(std::malloc(static_cast<size_t>(capacity) * size));
    if (data_ == nullptr) {
        ::munmap(mem, array_bytes_);
        return -ENOMEM;
    }
    array_ = mem;
    count_ = 0;
    capacity_ = capacity;
    size_ = size;
    group_ = group;
    io_uring_buf_reg reg{};
    reg.ring_addr = reinterpret_cast<uint64_t>(array_);
    reg.ring_entries = capacity;
    reg.bgid = group;
    const int rc = ring.do_register(IORING_REGISTER_PBUF_RING, &reg, 1);
    if (rc < 0) {
        release();
        return rc;
    }
    tail_ = 0;
    grow(count);
    return 0;
}

io_uring_buf* BufferRing::entries() const noexcept {
    // Not array_->bufs: the header declares it with __DECLARE_FLEX_ARRAY, whose empty struct
    // has size 1 in C++ (0 in C), which moves `bufs` to offset 8. The ABI is a plain array of
    // io_uring_buf starting at the ring's address, the tail overlaying entry 0's `resv`.
    return reinterpret_cast<io_uring_buf*>(array_);
}

uint16_t* BufferRing::tail_word() const noexcept {
    return &entries()[0].resv;
}

void BufferRing::add(unsigned bid, unsigned slot) noexcept {
    // Field by field: entry 0's `resv` shares its bytes with the ring's tail.
    io_uring_buf& b = entries()[slot & (capacity_ - 1)];
    b.addr = reinterpret_cast<uint64_t>(buffer(bid));
    b.len = size_;
    b.bid = static_cast<uint16_t>(bid);
}

void BufferRing::recycle(unsigned bid) noexcept {
    add(bid, tail_);
    ++tail_;
    // Release: the entry is complete before the kernel, loading the tail with acquire, uses it.
    store_release(tail_word(), tail_);
}

void BufferRing::grow(unsigned n) noexcept {
    n = std::min(n, capacity_);
    if (n <= count_) return;
    // Every buffer is in the ring or in our hands, so n <= capacity_ entries always fit.
    for (unsigned bid = count_; bid < n; ++bid) add(bid, tail_++);
    count_ = n;
    store_release(tail_word(), tail_);
}

void BufferRing::release() noexcept {
    if (array_ != nullptr) ::munmap(array_, array_bytes_);
    std::free(data_);
    array_ = nullptr;
    data_ = nullptr;
}

}  // namespace uring
}  // namespace iocpnative
