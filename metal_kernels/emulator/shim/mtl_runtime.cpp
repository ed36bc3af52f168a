// mtl_runtime.cpp: the scheduler behind the Metal-kernel emulator (compiled once, linked into
// every kernel library).
//
// Each threadgroup's threads run as cooperative fibers on one OS thread. A fiber runs until it
// reaches a synchronisation point (threadgroup_barrier, a simdgroup/quadgroup collective) or
// returns. A threadgroup barrier completes when every thread of the threadgroup waits at the
// same barrier; a collective completes when every *active* (not yet returned) lane of the
// simdgroup waits at the same collective, which is Metal's rule for partial simdgroups. Any
// other state is a divergence or a deadlock and is reported with the source lines involved.
//
// Buffers live between PROT_NONE guard regions, so out-of-bounds accesses fault; the fault is
// caught (SIGSEGV/SIGBUS/SIGFPE/SIGILL on an alternate stack), the launch is abandoned and the
// address, access kind and program counter go back to Python, which names the buffer and line.
#define MTL_SHIM_ABI_ONLY
#include "mtl_shim.h"

#include <dlfcn.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <vector>

#if defined(__x86_64__) && !defined(MTL_RT_USE_UCONTEXT)
#define MTL_RT_ASM_SWITCH 1
#else
#define MTL_RT_ASM_SWITCH 0
#endif

#define MTL_RT_HIDDEN __attribute__((visibility("hidden")))

#if MTL_RT_ASM_SWITCH
// mtl_rt_ctx_switch(save, load): saves the callee-saved registers, MXCSR and the x87 control
// word on the current stack, stores the stack pointer in *save, and resumes the context whose
// stack pointer is `load` (System V x86-64 ABI).
extern "C" MTL_RT_HIDDEN void mtl_rt_ctx_switch(void** save, void* load);
asm(R"(
  .text
  .p2align 4
  .globl mtl_rt_ctx_switch
  .hidden mtl_rt_ctx_switch
  .type mtl_rt_ctx_switch, @function
mtl_rt_ctx_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size mtl_rt_ctx_switch, .-mtl_rt_ctx_switch
)");
#endif

namespace {

enum FiberState { READY, WAIT_SIMD, WAIT_TG, DONE };

struct Fiber {
#if MTL_RT_ASM_SWITCH
  void* sp;
#else
  ucontext_t uc;
#endif
  mtl_rt_thread_attrs attrs;
  FiberState state;
  int wait_op;
  const char* wait_what;
  int wait_line;
  const char* wait_file;
  uint32_t sg;
  uint32_t lane;
};

struct SimdGroup {
  uint32_t first;  // index of lane 0's fiber
  uint32_t count;  // lanes that exist (partial simdgroups at threadgroup edges)
  uint32_t waiting;
  uint32_t done;
  uint32_t gen;          // completed collectives; slots/masks are double-buffered by gen & 1
  uint32_t mask[2];      // lanes that took part, per buffer
  alignas(16) unsigned char slots[2][32][MTL_RT_SLOT_BYTES];
};

struct TgSite {
  int site;
  void* data;
  size_t size;
  const char* name;
  int line;
  const char* file;
  uint64_t gen;  // threadgroup generation that last poisoned it
};

struct Alloc {
  char* base;
  size_t total;
  char* rw;         // first read/write byte (page aligned)
  size_t rw_bytes;  // read/write bytes (page multiple)
  char* data;
  size_t nbytes;
};

struct State {
  mtl_rt_launch* launch = nullptr;
  mtl_rt_entry_fn entry = nullptr;
  std::vector<Fiber> fibers;
  std::vector<SimdGroup> sgs;
  std::vector<uint32_t> ready;
  size_t ready_head = 0;
  uint32_t tg_waiting = 0;
  uint32_t tg_done = 0;
  uint32_t n_threads = 0;
  Fiber* cur = nullptr;
  volatile sig_atomic_t in_fiber = 0;
  pthread_t owner;  // the thread running the launch; faults elsewhere are not ours
  bool aborted = false;
  uint64_t rng = 0;
  uint64_t tg_gen = 0;
  std::vector<TgSite> tg_sites;
  size_t tg_bytes = 0;
  uint32_t tg_pos[3] = {0, 0, 0};
#if MTL_RT_ASM_SWITCH
  void* sched_sp = nullptr;
  void* dead_sp = nullptr;
#else
  ucontext_t sched_uc;
#endif
  // Fault details recorded by the signal handler.
  int fault_sig = 0;
  uintptr_t fault_addr = 0;
  uintptr_t fault_pc = 0;
  int fault_write = -1;
};

State g;
std::vector<Alloc> g_allocs;
char* g_stack_pool = nullptr;
size_t g_stack_pool_bytes = 0;
size_t g_stack_slot = 0;  // guard page + stack
size_t g_stack_count = 0;
alignas(16) char g_altstack[1 << 16];

size_t page_size() {
  static size_t p = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return p;
}
size_t round_up(size_t n, size_t m) { return (n + m - 1) / m * m; }

uint64_t next_rand() {  // splitmix64
  uint64_t z = (g.rng += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

void set_error(int code, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
void set_error(int code, const char* fmt, ...) {
  mtl_rt_launch* L = g.launch;
  if (L->error != MTL_RT_OK) return;  // keep the first error
  L->error = code;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(L->message, sizeof(L->message), fmt, ap);
  va_end(ap);
  for (int i = 0; i < 3; ++i) L->err_threadgroup[i] = g.tg_pos[i];
}

void set_error_location(const Fiber* f, int line, const char* file) {
  mtl_rt_launch* L = g.launch;
  if (f) {
    L->err_thread[0] = f->attrs.thread_position_in_grid.x;
    L->err_thread[1] = f->attrs.thread_position_in_grid.y;
    L->err_thread[2] = f->attrs.thread_position_in_grid.z;
  }
  L->err_line = line;
  snprintf(L->err_file, sizeof(L->err_file), "%s", file ? file : "");
}

// ----- fibers ---------------------------------------------------------------------------------

void yield_to_scheduler() {
  Fiber* f = g.cur;
#if MTL_RT_ASM_SWITCH
  mtl_rt_ctx_switch(&f->sp, g.sched_sp);
#else
  swapcontext(&f->uc, &g.sched_uc);
#endif
}

[[noreturn]] void abort_from_fiber() {
  g.aborted = true;
  g.in_fiber = 0;
#if MTL_RT_ASM_SWITCH
  mtl_rt_ctx_switch(&g.dead_sp, g.sched_sp);
#else
  setcontext(&g.sched_uc);
#endif
  __builtin_trap();
}

void fiber_main() {
  Fiber* f = g.cur;
  g.entry(g.launch->buffers, &f->attrs);
  f->state = DONE;
  yield_to_scheduler();
  __builtin_trap();  // a finished fiber is never resumed
}

#if !MTL_RT_ASM_SWITCH
extern "C" void mtl_rt_fiber_main_c() { fiber_main(); }
#endif

bool ensure_stacks(size_t count, size_t stack_bytes) {
  size_t page = page_size();
  size_t slot = page + round_up(stack_bytes, page);
  if (g_stack_pool && g_stack_slot == slot && g_stack_count >= count) return true;
  if (g_stack_pool) munmap(g_stack_pool, g_stack_pool_bytes);
  g_stack_pool = nullptr;
  size_t bytes = slot * count;
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                 -1, 0);
  if (p == MAP_FAILED) return false;
  g_stack_pool = static_cast<char*>(p);
  g_stack_pool_bytes = bytes;
  g_stack_slot = slot;
  g_stack_count = count;
  for (size_t i = 0; i < count; ++i) {
    mprotect(g_stack_pool + i * slot, page, PROT_NONE);  // guard below each stack
  }
  return true;
}

void init_fiber_context(Fiber& f, size_t index) {
  char* lo = g_stack_pool + index * g_stack_slot + page_size();
  char* hi = g_stack_pool + (index + 1) * g_stack_slot;
#if MTL_RT_ASM_SWITCH
  // Frame popped by mtl_rt_ctx_switch: [mxcsr|fpucw][r15 r14 r13 r12 rbx rbp][ret=fiber_main]
  // [fake return address 0]. fiber_main starts with rsp % 16 == 8, as after a call.
  uintptr_t top = reinterpret_cast<uintptr_t>(hi) & ~uintptr_t(15);
  uint64_t* sp = reinterpret_cast<uint64_t*>(top);
  *--sp = 0;
  *--sp = reinterpret_cast<uint64_t>(&fiber_main);
  for (int i = 0; i < 6; ++i) *--sp = 0;
  --sp;
  uint32_t ctrl[2] = {0x1f80u, 0x037fu};
  memcpy(sp, ctrl, sizeof(ctrl));
  f.sp = sp;
#else
  getcontext(&f.uc);
  f.uc.uc_stack.ss_sp = lo;
  f.uc.uc_stack.ss_size = static_cast<size_t>(hi - lo);
  f.uc.uc_link = nullptr;
  makecontext(&f.uc, reinterpret_cast<void (*)()>(&mtl_rt_fiber_main_c), 0);
#endif
  (void)lo;
}

void run_fiber(uint32_t index) {
  Fiber* f = &g.fibers[index];
  g.cur = f;
  g.in_fiber = 1;
#if MTL_RT_ASM_SWITCH
  mtl_rt_ctx_switch(&g.sched_sp, f->sp);
#else
  swapcontext(&g.sched_uc, &f->uc);
#endif
  g.in_fiber = 0;
}

void push_ready(uint32_t i) {
  g.fibers[i].state = READY;
  g.ready.push_back(i);
}

// ----- synchronisation ------------------------------------------------------------------------

bool same_site(const Fiber& a, const Fiber& b) {
  return a.wait_op == b.wait_op && a.wait_line == b.wait_line &&
         strcmp(a.wait_what, b.wait_what) == 0 && strcmp(a.wait_file, b.wait_file) == 0;
}

void describe_thread(const Fiber& f, char* out, size_t n) {
  snprintf(out, n, "(%u,%u,%u)", f.attrs.thread_position_in_grid.x,
           f.attrs.thread_position_in_grid.y, f.attrs.thread_position_in_grid.z);
}

// Completes the simdgroup's collective if every active lane waits at it.
void check_simdgroup(uint32_t sgi) {
  SimdGroup& s = g.sgs[sgi];
  if (s.waiting == 0 || s.waiting + s.done != s.count) return;
  const Fiber* ref = nullptr;
  uint32_t mask = 0;
  for (uint32_t l = 0; l < s.count; ++l) {
    const Fiber& f = g.fibers[s.first + l];
    if (f.state != WAIT_SIMD) continue;
    if (!ref) {
      ref = &f;
    } else if (!same_site(*ref, f)) {
      char a[64], b[64];
      describe_thread(*ref, a, sizeof(a));
      describe_thread(f, b, sizeof(b));
      set_error(MTL_RT_ERR_BARRIER,
                "divergent simdgroup collectives in simdgroup %u: thread %s waits at %s "
                "(%s:%d) while thread %s waits at %s (%s:%d); collectives must be reached "
                "in simdgroup-uniform control flow",
                sgi, a, ref->wait_what, ref->wait_file, ref->wait_line, b, f.wait_what,
                f.wait_file, f.wait_line);
      set_error_location(&f, f.wait_line, f.wait_file);
      return;
    }
    mask |= 1u << l;
  }
  s.mask[s.gen & 1u] = mask;
  s.gen++;
  s.waiting = 0;
  for (uint32_t l = 0; l < s.count; ++l) {
    if (g.fibers[s.first + l].state == WAIT_SIMD) push_ready(s.first + l);
  }
}

// Completes the threadgroup barrier if every thread waits at it; a thread that returned
// without reaching it is an error (Metal requires all threads to execute the barrier).
void check_threadgroup() {
  if (g.tg_waiting == 0 || g.tg_waiting + g.tg_done != g.n_threads) return;
  const Fiber* ref = nullptr;
  const Fiber* exited = nullptr;
  for (const Fiber& f : g.fibers) {
    if (f.state == WAIT_TG) {
      if (!ref) {
        ref = &f;
      } else if (!same_site(*ref, f)) {
        char a[64], b[64];
        describe_thread(*ref, a, sizeof(a));
        describe_thread(f, b, sizeof(b));
        set_error(MTL_RT_ERR_BARRIER,
                  "divergent threadgroup barriers: thread %s waits at threadgroup_barrier "
                  "(%s:%d) while thread %s waits at threadgroup_barrier (%s:%d)",
                  a, ref->wait_file, ref->wait_line, b, f.wait_file, f.wait_line);
        set_error_location(&f, f.wait_line, f.wait_file);
        return;
      }
    } else if (f.state == DONE && !exited) {
      exited = &f;
    }
  }
  if (exited) {
    char a[64];
    describe_thread(*exited, a, sizeof(a));
    set_error(MTL_RT_ERR_BARRIER,
              "threadgroup_barrier at %s:%d reached by %u of %u threads of the threadgroup; "
              "%u returned without reaching it (e.g. thread %s); every thread of a "
              "threadgroup must execute each barrier",
              ref->wait_file, ref->wait_line, g.tg_waiting, g.n_threads, g.tg_done, a);
    set_error_location(exited, ref->wait_line, ref->wait_file);
    return;
  }
  g.tg_waiting = 0;
  for (uint32_t i = 0; i < g.n_threads; ++i) {
    if (g.fibers[i].state == WAIT_TG) push_ready(i);
  }
}

void report_deadlock() {
  const Fiber* tg = nullptr;
  const Fiber* sd = nullptr;
  uint32_t n_tg = 0, n_sd = 0;
  for (const Fiber& f : g.fibers) {
    if (f.state == WAIT_TG) {
      n_tg++;
      if (!tg) tg = &f;
    } else if (f.state == WAIT_SIMD) {
      n_sd++;
      if (!sd) sd = &f;
    }
  }
  if (tg && sd) {
    char a[64], b[64];
    describe_thread(*tg, a, sizeof(a));
    describe_thread(*sd, b, sizeof(b));
    set_error(MTL_RT_ERR_BARRIER,
              "deadlock: %u threads wait at threadgroup_barrier (%s:%d, e.g. thread %s) "
              "while %u wait at %s (%s:%d, e.g. thread %s)",
              n_tg, tg->wait_file, tg->wait_line, a, n_sd, sd->wait_what, sd->wait_file,
              sd->wait_line, b);
    set_error_location(sd, sd->wait_line, sd->wait_file);
  } else {
    set_error(MTL_RT_ERR_INTERNAL, "deadlock with %u threads at barriers and %u at collectives",
              n_tg, n_sd);
  }
}

// ----- threadgroups ---------------------------------------------------------------------------

void setup_threadgroup(const uint32_t tgp[3]) {
  mtl_rt_launch* L = g.launch;
  uint32_t dims[3], grid_tgs[3];
  for (int d = 0; d < 3; ++d) {
    grid_tgs[d] = (L->grid[d] + L->threadgroup[d] - 1) / L->threadgroup[d];
    // Edge threadgroups are partial: no threads exist past the grid (dispatchThreads).
    uint32_t start = tgp[d] * L->threadgroup[d];
    dims[d] = L->grid[d] - start < L->threadgroup[d] ? L->grid[d] - start : L->threadgroup[d];
    g.tg_pos[d] = tgp[d];
  }
  uint32_t n = dims[0] * dims[1] * dims[2];
  uint32_t dispatch_n = L->threadgroup[0] * L->threadgroup[1] * L->threadgroup[2];
  g.n_threads = n;
  g.tg_waiting = 0;
  g.tg_done = 0;
  g.fibers.resize(n);
  uint32_t n_sg = (n + 31) / 32;
  g.sgs.resize(n_sg);
  for (uint32_t s = 0; s < n_sg; ++s) {
    SimdGroup& sg = g.sgs[s];
    sg.first = s * 32;
    sg.count = n - s * 32 < 32 ? n - s * 32 : 32;
    sg.waiting = 0;
    sg.done = 0;
    sg.gen = 0;
    sg.mask[0] = sg.mask[1] = 0;
  }
  g.ready.clear();
  g.ready_head = 0;
  // Linear thread index uses this threadgroup's actual size (threads_per_threadgroup).
  for (uint32_t z = 0; z < dims[2]; ++z) {
    for (uint32_t y = 0; y < dims[1]; ++y) {
      for (uint32_t x = 0; x < dims[0]; ++x) {
        uint32_t lin = x + y * dims[0] + z * dims[0] * dims[1];
        Fiber& f = g.fibers[lin];
        mtl_rt_thread_attrs& a = f.attrs;
        a.dispatch_threads_per_threadgroup = {L->threadgroup[0], L->threadgroup[1],
                                              L->threadgroup[2]};
        a.grid_origin = {0, 0, 0};
        a.grid_size = {L->grid[0], L->grid[1], L->grid[2]};
        a.threads_per_grid = {L->grid[0], L->grid[1], L->grid[2]};
        a.thread_position_in_threadgroup = {x, y, z};
        a.threadgroup_position_in_grid = {tgp[0], tgp[1], tgp[2]};
        a.thread_position_in_grid = {tgp[0] * L->threadgroup[0] + x,
                                     tgp[1] * L->threadgroup[1] + y,
                                     tgp[2] * L->threadgroup[2] + z};
        a.threadgroups_per_grid = {grid_tgs[0], grid_tgs[1], grid_tgs[2]};
        a.threads_per_threadgroup = {dims[0], dims[1], dims[2]};
        a.dispatch_quadgroups_per_threadgroup = (dispatch_n + 3) / 4;
        a.dispatch_simdgroups_per_threadgroup = (dispatch_n + 31) / 32;
        a.quadgroup_index_in_threadgroup = lin / 4;
        a.quadgroups_per_threadgroup = (n + 3) / 4;
        a.simdgroup_index_in_threadgroup = lin / 32;
        a.simdgroups_per_threadgroup = n_sg;
        a.thread_execution_width = 32;
        a.thread_index_in_quadgroup = lin % 4;
        a.thread_index_in_simdgroup = lin % 32;
        a.thread_index_in_threadgroup = lin;
        a.threads_per_simdgroup = 32;
        f.state = READY;
        f.sg = lin / 32;
        f.lane = lin % 32;
        f.wait_what = "";
        f.wait_file = "";
        f.wait_line = 0;
        f.wait_op = -1;
        init_fiber_context(f, lin);
      }
    }
  }
  for (uint32_t i = 0; i < n; ++i) g.ready.push_back(i);
  g.tg_gen++;  // threadgroup memory is re-poisoned on first use in this threadgroup
}

// Runs one threadgroup to completion; false on error.
bool run_threadgroup() {
  uint32_t done = 0;
  mtl_rt_launch* L = g.launch;
  while (done < g.n_threads) {
    size_t avail = g.ready.size() - g.ready_head;
    if (avail == 0) {
      report_deadlock();
      return false;
    }
    uint32_t idx;
    if (L->randomize) {
      size_t pick = g.ready_head + static_cast<size_t>(next_rand() % avail);
      idx = g.ready[pick];
      g.ready[pick] = g.ready.back();
      g.ready.pop_back();
    } else {
      idx = g.ready[g.ready_head++];
    }
    if (g.ready_head == g.ready.size()) {
      g.ready.clear();
      g.ready_head = 0;
    }
    run_fiber(idx);
    if (g.aborted) return false;
    Fiber& f = g.fibers[idx];
    if (f.state == DONE) {
      done++;
      g.tg_done++;
      g.sgs[f.sg].done++;
      check_simdgroup(f.sg);
      check_threadgroup();
    } else if (f.state == WAIT_SIMD) {
      g.sgs[f.sg].waiting++;
      check_simdgroup(f.sg);
    } else if (f.state == WAIT_TG) {
      g.tg_waiting++;
      check_threadgroup();
    }
    if (L->error != MTL_RT_OK) return false;
  }
  return true;
}

// ----- signals --------------------------------------------------------------------------------

const int kSignals[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL};
struct sigaction g_old_actions[4];
stack_t g_old_altstack;

void on_fault(int sig, siginfo_t* info, void* ctx) {
  if (!g.in_fiber || !pthread_equal(pthread_self(), g.owner)) {
    // Not ours: restore the previous handlers and let the fault happen again.
    for (int i = 0; i < 4; ++i) sigaction(kSignals[i], &g_old_actions[i], nullptr);
    return;
  }
  g.fault_sig = sig;
  g.fault_addr = reinterpret_cast<uintptr_t>(info->si_addr);
  ucontext_t* uc = static_cast<ucontext_t*>(ctx);
#if defined(__x86_64__)
  g.fault_pc = static_cast<uintptr_t>(uc->uc_mcontext.gregs[REG_RIP]);
  g.fault_write = sig == SIGSEGV ? ((uc->uc_mcontext.gregs[REG_ERR] & 2) ? 1 : 0) : -1;
#elif defined(__aarch64__)
  g.fault_pc = static_cast<uintptr_t>(uc->uc_mcontext.pc);
  g.fault_write = -1;
#else
  (void)uc;
  g.fault_pc = 0;
  g.fault_write = -1;
#endif
  abort_from_fiber();
}

void install_signal_handlers() {
  stack_t ss;
  ss.ss_sp = g_altstack;
  ss.ss_size = sizeof(g_altstack);
  ss.ss_flags = 0;
  sigaltstack(&ss, &g_old_altstack);
  struct sigaction sa;
  memset(&sa, 0, sizeof(sa));
  sa.sa_sigaction = on_fault;
  // SA_NODEFER: we leave the handler by switching stacks, never by returning.
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
  sigemptyset(&sa.sa_mask);
  for (int i = 0; i < 4; ++i) sigaction(kSignals[i], &sa, &g_old_actions[i]);
}

void restore_signal_handlers() {
  for (int i = 0; i < 4; ++i) sigaction(kSignals[i], &g_old_actions[i], nullptr);
  if (!(g_old_altstack.ss_flags & SS_DISABLE)) {
    sigaltstack(&g_old_altstack, nullptr);
  } else {
    stack_t off;
    memset(&off, 0, sizeof(off));
    off.ss_flags = SS_DISABLE;
    sigaltstack(&off, nullptr);
  }
}

void report_fault() {
  mtl_rt_launch* L = g.launch;
  if (L->error != MTL_RT_OK) return;  // an error raised from inside a fiber (e.g. limits)
  L->error = MTL_RT_ERR_FAULT;
  L->fault_signal = g.fault_sig;
  L->fault_addr = g.fault_addr;
  L->fault_write = g.fault_write;
  // Only a pc inside this kernel library maps to a source line (not one in libc/libm).
  Dl_info info, self;
  if (g.fault_pc && dladdr(reinterpret_cast<void*>(g.fault_pc), &info) &&
      dladdr(reinterpret_cast<void*>(&mtl_rt_launch_kernel), &self) &&
      info.dli_fbase == self.dli_fbase) {
    L->fault_pc_offset = g.fault_pc - reinterpret_cast<uintptr_t>(info.dli_fbase);
  }
  set_error_location(g.cur, 0, "");
  for (int i = 0; i < 3; ++i) L->err_threadgroup[i] = g.tg_pos[i];
  // Name the threadgroup array or fiber stack the address falls in; Python names device
  // buffers.
  char* a = reinterpret_cast<char*>(g.fault_addr);
  for (const TgSite& s : g.tg_sites) {
    char* d = static_cast<char*>(s.data);
    if (a >= d - (1 << 16) && a < d + s.size + (1 << 20)) {
      snprintf(L->message, sizeof(L->message),
               "threadgroup array '%s' (declared at %s:%d, %zu bytes) at byte offset %lld",
               s.name, s.file, s.line, s.size, static_cast<long long>(a - d));
      return;
    }
  }
  if (g_stack_pool && a >= g_stack_pool && a < g_stack_pool + g_stack_pool_bytes) {
    size_t off = static_cast<size_t>(a - g_stack_pool) % g_stack_slot;
    if (off < page_size()) {
      snprintf(L->message, sizeof(L->message),
               "stack overflow of the emulated thread (deep or unbounded recursion, or very "
               "large local arrays)");
    }
  }
}

void free_tg_sites() {
  for (TgSite& s : g.tg_sites) mtl_rt_buffer_free(s.data);
  g.tg_sites.clear();
  g.tg_bytes = 0;
}

}  // namespace

// ----- C API ----------------------------------------------------------------------------------

extern "C" {

mtl_rt_simd_view mtl_rt_simd_exchange(const void* value, uint32_t size, int op, const char* what,
                                      int line, const char* file) {
  Fiber* f = g.cur;
  SimdGroup& s = g.sgs[f->sg];
  uint32_t b = s.gen & 1u;
  if (size) memcpy(s.slots[b][f->lane], value, size);
  f->state = WAIT_SIMD;
  f->wait_op = op;
  f->wait_what = what;
  f->wait_line = line;
  f->wait_file = file;
  yield_to_scheduler();
  mtl_rt_simd_view v;
  v.slots = &s.slots[b][0][0];
  v.active = s.mask[b];
  v.lane = f->lane;
  return v;
}

void mtl_rt_threadgroup_barrier(int line, const char* file) {
  Fiber* f = g.cur;
  f->state = WAIT_TG;
  f->wait_op = MTL_RT_OP_BARRIER;
  f->wait_what = "threadgroup_barrier";
  f->wait_line = line;
  f->wait_file = file;
  yield_to_scheduler();
}

void* mtl_rt_tg_alloc(int site, size_t size, size_t align, const char* name, int line,
                      const char* file) {
  (void)align;  // guarded buffers are 16-byte aligned, enough for every Metal type
  TgSite* s = nullptr;
  for (TgSite& t : g.tg_sites) {
    if (t.site == site) s = &t;
  }
  if (!s) {
    size_t total = g.tg_bytes + round_up(size, 16);
    if (total > g.launch->max_threadgroup_memory) {
      set_error(MTL_RT_ERR_LIMIT,
                "threadgroup memory: '%s' (%zu bytes, %s:%d) brings the total to %zu bytes, "
                "over the %u-byte limit of Apple GPUs",
                name, size, file, line, total, g.launch->max_threadgroup_memory);
      set_error_location(g.cur, line, file);
      abort_from_fiber();
    }
    void* data = mtl_rt_buffer_alloc(size, 0xff);
    if (!data) {
      set_error(MTL_RT_ERR_INTERNAL, "could not map threadgroup memory for '%s'", name);
      abort_from_fiber();
    }
    g.tg_sites.push_back(TgSite{site, data, size, name, line, file, g.tg_gen});
    g.tg_bytes = total;
    return data;
  }
  if (s->gen != g.tg_gen) {  // first use in this threadgroup: poison (uninitialised memory)
    memset(s->data, 0xff, s->size);
    s->gen = g.tg_gen;
  }
  return s->data;
}

void* mtl_rt_buffer_alloc(size_t nbytes, int fill) {
  size_t page = page_size();
  // Data ends 16-byte aligned at the end of its pages, so overruns hit the guard region at
  // once (or, within the <16-byte tail slack, are found by mtl_rt_buffer_check_slack).
  size_t padded = round_up(nbytes, 16);
  size_t rw = round_up(padded, page);
  size_t before = 16 * page;
  size_t after = rw > (size_t(1) << 20) ? rw : (size_t(1) << 20);
  size_t total = before + rw + after;
  void* p = mmap(nullptr, total, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) return nullptr;
  char* base = static_cast<char*>(p);
  char* rwp = base + before;
  if (rw && mprotect(rwp, rw, PROT_READ | PROT_WRITE) != 0) {
    munmap(p, total);
    return nullptr;
  }
  if (rw) memset(rwp, 0xff, rw);
  char* data = rwp + rw - padded;
  if (fill >= 0 && nbytes) memset(data, fill, nbytes);
  g_allocs.push_back(Alloc{base, total, rwp, rw, data, nbytes});
  return data;
}

static Alloc* find_alloc(void* data) {
  for (Alloc& a : g_allocs) {
    if (a.data == data) return &a;
  }
  return nullptr;
}

int mtl_rt_buffer_protect_readonly(void* data) {
  Alloc* a = find_alloc(data);
  if (!a) return -1;
  if (!a->rw_bytes) return 0;
  return mprotect(a->rw, a->rw_bytes, PROT_READ);
}

// Offset (relative to the data start) of the first modified slack byte, or INT64_MIN.
long long mtl_rt_buffer_check_slack(void* data) {
  Alloc* a = find_alloc(data);
  if (!a) return INT64_MIN;
  for (char* q = a->rw; q < a->data; ++q) {
    if (static_cast<unsigned char>(*q) != 0xff) return static_cast<long long>(q - a->data);
  }
  for (char* q = a->data + a->nbytes; q < a->rw + a->rw_bytes; ++q) {
    if (static_cast<unsigned char>(*q) != 0xff) return static_cast<long long>(q - a->data);
  }
  return INT64_MIN;
}

void mtl_rt_buffer_free(void* data) {
  for (size_t i = 0; i < g_allocs.size(); ++i) {
    if (g_allocs[i].data == data) {
      munmap(g_allocs[i].base, g_allocs[i].total);
      g_allocs[i] = g_allocs.back();
      g_allocs.pop_back();
      return;
    }
  }
}

int mtl_rt_launch_kernel(mtl_rt_launch* L, mtl_rt_entry_fn entry) {
  L->error = MTL_RT_OK;
  L->message[0] = 0;
  L->err_file[0] = 0;
  L->err_line = 0;
  L->fault_signal = 0;
  L->fault_addr = 0;
  L->fault_pc_offset = 0;
  L->fault_write = -1;
  g.launch = L;
  g.entry = entry;
  g.aborted = false;
  g.rng = L->seed;
  g.cur = nullptr;
  g.owner = pthread_self();
  free_tg_sites();
  uint32_t tg_total = L->threadgroup[0] * L->threadgroup[1] * L->threadgroup[2];
  if (!ensure_stacks(tg_total, L->stack_bytes)) {
    snprintf(L->message, sizeof(L->message), "could not map %u fiber stacks", tg_total);
    L->error = MTL_RT_ERR_INTERNAL;
    return L->error;
  }
  g.fibers.reserve(tg_total);
  uint32_t ntg[3];
  for (int d = 0; d < 3; ++d) ntg[d] = (L->grid[d] + L->threadgroup[d] - 1) / L->threadgroup[d];
  uint64_t n_groups = uint64_t(ntg[0]) * ntg[1] * ntg[2];
  std::vector<uint64_t> order(n_groups);
  for (uint64_t i = 0; i < n_groups; ++i) order[i] = i;
  if (L->randomize) {
    for (uint64_t i = n_groups; i > 1; --i) {
      uint64_t j = next_rand() % i;
      uint64_t t = order[i - 1];
      order[i - 1] = order[j];
      order[j] = t;
    }
  }
  install_signal_handlers();
  for (uint64_t k = 0; k < n_groups && L->error == MTL_RT_OK; ++k) {
    uint64_t i = order[k];
    uint32_t tgp[3] = {uint32_t(i % ntg[0]), uint32_t((i / ntg[0]) % ntg[1]),
                       uint32_t(i / (uint64_t(ntg[0]) * ntg[1]))};
    setup_threadgroup(tgp);
    if (!run_threadgroup()) {
      if (g.aborted) report_fault();
      break;
    }
  }
  restore_signal_handlers();
  // Writes that stayed inside a threadgroup array's page but outside the array.
  if (L->error == MTL_RT_OK) {
    for (const TgSite& s : g.tg_sites) {
      long long off = mtl_rt_buffer_check_slack(s.data);
      if (off != INT64_MIN) {
        L->error = MTL_RT_ERR_FAULT;
        L->fault_write = 1;
        snprintf(L->message, sizeof(L->message),
                 "threadgroup array '%s' (declared at %s:%d, %zu bytes) was written at byte "
                 "offset %lld, outside the array (found after the run)",
                 s.name, s.file, s.line, s.size, off);
        break;
      }
    }
  }
  free_tg_sites();
  // Give the touched stack pages back; the mapping (and its guard pages) is kept for reuse.
  madvise(g_stack_pool, g_stack_pool_bytes, MADV_DONTNEED);
  g.launch = nullptr;
  return L->error;
}

}  // extern "C"
