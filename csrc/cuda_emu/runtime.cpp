// The fiber scheduler behind csrc/cuda_emu/cuda_emu.h: blocks, barriers, warp shuffles, launch
// errors and the emulated device's attributes.
#include "cuda_emu/cuda_emu.h"

#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

namespace magneto::cuda_emu {
namespace {

constexpr int kMaxBlockThreads = 1024;
constexpr size_t kStackBytes = 64 * 1024;

enum class State { kRunnable, kBarrier, kShuffle, kDone };

struct Fiber {
  ucontext_t context;
  State state = State::kRunnable;
  const char* file = nullptr;  // where it waits
  int line = 0;
  uint64_t shuffle_result = 0;
};

// The lanes of one warp waiting at one shuffle.
struct PendingShuffle {
  Shfl kind;
  const char* file;
  int line;
  unsigned mask;
  int width;
  unsigned arrived = 0;
  uint64_t value[32];
  int arg[32];
};

struct Block {
  ucontext_t scheduler;
  std::vector<Fiber> fibers;
  std::vector<std::vector<PendingShuffle>> warps;
  int current = 0;
  std::string error;
  void (*body)(const void*) = nullptr;
  const void* params = nullptr;
};

thread_local Block* running = nullptr;  // the block whose fibers run now
thread_local cudaError_t last_error = cudaSuccess;
thread_local std::string last_message;

// The fiber stacks of this OS thread, reserved once (pages are touched only as used).
char* stacks() {
  thread_local char* base = [] {
    void* p = mmap(nullptr, kStackBytes * kMaxBlockThreads, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    return p == MAP_FAILED ? nullptr : static_cast<char*>(p);
  }();
  return base;
}

std::string where(const char* file, int line) {
  std::string f = file ? file : "?";
  const size_t slash = f.rfind('/');
  if (slash != std::string::npos) f = f.substr(slash + 1);
  return f + ":" + std::to_string(line);
}

std::string block_name() {
  const uint3 b = builtins.block_idx;
  return "block (" + std::to_string(b.x) + "," + std::to_string(b.y) + "," + std::to_string(b.z) +
         ")";
}

uint3 thread_index(int linear) {
  const dim3 d = builtins.block_dim;
  return {static_cast<unsigned>(linear) % d.x, (static_cast<unsigned>(linear) / d.x) % d.y,
          static_cast<unsigned>(linear) / (d.x * d.y)};
}

// Back to the scheduler from the current fiber.
void yield_fiber() {
  Block& b = *running;
  swapcontext(&b.fibers[b.current].context, &b.scheduler);
}

// Fails the launch from inside a fiber; the scheduler never resumes it.
[[noreturn]] void fail(const std::string& message) {
  Block& b = *running;
  b.error = message;
  b.fibers[b.current].state = State::kDone;
  yield_fiber();
  __builtin_unreachable();
}

void fiber_entry() {
  Block& b = *running;
  b.body(b.params);
  b.fibers[b.current].state = State::kDone;  // uc_link returns to the scheduler
}

std::string lanes(unsigned bits) {
  std::string s;
  for (int l = 0; l < 32; ++l)
    if (bits & (1u << l)) s += (s.empty() ? "" : ",") + std::to_string(l);
  return s.empty() ? "none" : s;
}

// Why nothing can run: the first barrier or shuffle that cannot complete.
std::string deadlock(const Block& b) {
  const int n = static_cast<int>(b.fibers.size());
  for (size_t w = 0; w < b.warps.size(); ++w) {
    for (const PendingShuffle& s : b.warps[w]) {
      unsigned exited = 0, absent = 0;
      for (int l = 0; l < 32; ++l) {
        if (!(s.mask & (1u << l)) || (s.arrived & (1u << l))) continue;
        const int t = static_cast<int>(w) * 32 + l;
        if (t >= n) absent |= 1u << l;
        else if (b.fibers[t].state == State::kDone) exited |= 1u << l;
      }
      char mask[16];
      std::snprintf(mask, sizeof mask, "0x%08x", s.mask);
      return "shuffle at " + where(s.file, s.line) + " in divergent code: warp " +
             std::to_string(w) + " of " + block_name() + ", mask " + mask + ", reached by lanes " +
             lanes(s.arrived) + "; lanes " + lanes(s.mask & ~s.arrived) +
             " never reach it (exited: " + lanes(exited) + ", not in the block: " + lanes(absent) +
             ", the others wait elsewhere)";
    }
  }
  int waiting = 0, done = 0;
  const Fiber* first = nullptr;
  bool same_site = true;
  for (const Fiber& f : b.fibers) {
    if (f.state == State::kDone) {
      ++done;
    } else if (f.state == State::kBarrier) {
      ++waiting;
      if (first == nullptr) first = &f;
      else same_site = same_site && f.file == first->file && f.line == first->line;
    }
  }
  if (first == nullptr) return "no runnable thread";
  if (!same_site)
    return "__syncthreads in divergent code: the threads of " + block_name() +
           " wait at different __syncthreads (first at " + where(first->file, first->line) + ")";
  return "__syncthreads at " + where(first->file, first->line) + " in divergent code: reached by " +
         std::to_string(waiting) + " of " + std::to_string(n) + " threads of " + block_name() +
         " (" + std::to_string(done) + " exited)";
}

// Runs one block to completion or to its first error.
void run_block(Block& b) {
  const int n = static_cast<int>(b.fibers.size());
  char* stack = stacks();
  for (int i = 0; i < n; ++i) {
    Fiber& f = b.fibers[i];
    f = Fiber{};
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = stack + static_cast<size_t>(i) * kStackBytes;
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = &b.scheduler;
    makecontext(&f.context, fiber_entry, 0);
  }
  for (auto& w : b.warps) w.clear();
  bool reverse = false;
  for (;;) {
    bool ran = false;
    for (int k = 0; k < n; ++k) {
      const int i = reverse ? n - 1 - k : k;
      if (b.fibers[i].state != State::kRunnable) continue;
      ran = true;
      b.current = i;
      builtins.thread_idx = thread_index(i);
      swapcontext(&b.scheduler, &b.fibers[i].context);
      if (!b.error.empty()) return;
    }
    if (ran) continue;  // a completed shuffle may have released lanes already passed over
    int at_barrier = 0, done = 0;
    for (const Fiber& f : b.fibers) {
      at_barrier += f.state == State::kBarrier;
      done += f.state == State::kDone;
    }
    if (done == n) return;
    bool same_site = at_barrier == n;
    for (int i = 1; same_site && i < n; ++i)
      same_site = b.fibers[i].file == b.fibers[0].file && b.fibers[i].line == b.fibers[0].line;
    if (!same_site) {
      b.error = deadlock(b);
      return;
    }
    for (Fiber& f : b.fibers) f.state = State::kRunnable;
    reverse = !reverse;
  }
}

void set_error(cudaError_t code, const std::string& message) {
  last_error = code;
  last_message = message;
}

}  // namespace

int occupancy(int block_threads, size_t dynamic_smem) {
  if (block_threads <= 0 || block_threads > kMaxBlockThreads ||
      dynamic_smem > static_cast<size_t>(kSharedPerBlock))
    return 0;
  int blocks = std::min(kBlocksPerSm, kThreadsPerSm / block_threads);
  if (dynamic_smem > 0) blocks = std::min(blocks, static_cast<int>(kSharedPerSm / dynamic_smem));
  return blocks;
}

void sync_threads(const char* file, int line) {
  Block& b = *running;
  Fiber& f = b.fibers[b.current];
  f.state = State::kBarrier;
  f.file = file;
  f.line = line;
  yield_fiber();
}

uint64_t shuffle_bits(Shfl kind, const char* file, int line, unsigned mask, uint64_t bits, int arg,
                      int width) {
  Block& b = *running;
  const int t = b.current;
  const int lane = t % 32;
  const unsigned me = 1u << lane;
  if (width < 1 || width > 32 || (width & (width - 1)) != 0)
    fail("shuffle at " + where(file, line) + ": width " + std::to_string(width) +
         " is not a power of two in 1..32");
  if (!(mask & me))
    fail("shuffle at " + where(file, line) + ": lane " + std::to_string(lane) +
         " is not in its own mask");
  std::vector<PendingShuffle>& pending = b.warps[t / 32];
  PendingShuffle* s = nullptr;
  for (PendingShuffle& p : pending) {
    if (p.mask == mask) {
      s = &p;
    } else if (p.mask & mask) {
      fail("shuffles at " + where(file, line) + " and " + where(p.file, p.line) +
           " with overlapping masks in one warp of " + block_name());
    }
  }
  if (s == nullptr) {
    pending.push_back(PendingShuffle{kind, file, line, mask, width});
    s = &pending.back();
  } else if (s->kind != kind || s->file != file || s->line != line || s->width != width) {
    fail("shuffle in divergent code: lanes of one warp of " + block_name() + " reach " +
         where(file, line) + " and " + where(s->file, s->line) + " with the same mask");
  }
  s->value[lane] = bits;
  s->arg[lane] = arg;
  s->arrived |= me;
  if (s->arrived != mask) {
    Fiber& f = b.fibers[t];
    f.state = State::kShuffle;
    f.file = file;
    f.line = line;
    yield_fiber();
    return f.shuffle_result;
  }
  // Every lane of the mask is here: exchange.
  const int warp_base = t - lane;
  uint64_t own = 0;
  for (int l = 0; l < 32; ++l) {
    if (!(mask & (1u << l))) continue;
    const int a = s->arg[l];
    const int group = l - l % width;
    int src = l;
    switch (s->kind) {
      case Shfl::kIdx: src = group + ((a % width) + width) % width; break;
      case Shfl::kUp: src = l % width >= a ? l - a : l; break;
      case Shfl::kDown: src = l % width + a < width ? l + a : l; break;
      case Shfl::kXor: src = ((l ^ a) < group + width) ? (l ^ a) : l; break;
    }
    if (src < 0 || src > 31 || !(mask & (1u << src)))
      fail("shuffle at " + where(file, line) + ": lane " + std::to_string(l) + " reads lane " +
           std::to_string(src) + ", which is not in the mask");
    const uint64_t result = s->value[src];
    if (l == lane) {
      own = result;
    } else {
      b.fibers[warp_base + l].shuffle_result = result;
      b.fibers[warp_base + l].state = State::kRunnable;
    }
  }
  pending.erase(pending.begin() + (s - pending.data()));
  return own;
}

void run_grid(const char* name, dim3 grid, dim3 block, size_t smem, void (*body)(const void*),
              const void* params) {
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  if (threads == 0 || threads > kMaxBlockThreads || block.z > 64 || grid.x == 0 || grid.y == 0 ||
      grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535 ||
      smem > static_cast<size_t>(kSharedPerBlock)) {
    set_error(cudaErrorInvalidConfiguration,
              std::string("invalid configuration argument (emulated launch at ") + name + ")");
    return;
  }
  if (stacks() == nullptr) {
    set_error(cudaErrorLaunchFailure, "emulated CUDA: cannot reserve fiber stacks");
    return;
  }
  Block b;
  b.fibers.resize(threads);
  b.warps.resize((threads + 31) / 32);
  b.body = body;
  b.params = params;
  // Dynamic shared memory starts as NaN (all bits set), as outputs in tests do, so that a read
  // before a write shows up.
  std::vector<uint32_t> dynamic((smem + 3) / 4, 0xffffffffu);
  Block* const outer = running;
  const Builtins saved = builtins;
  running = &b;
  builtins.block_dim = block;
  builtins.grid_dim = grid;
  builtins.dynamic_smem = dynamic.empty() ? nullptr : dynamic.data();
  for (unsigned z = 0; z < grid.z && b.error.empty(); ++z)
    for (unsigned y = 0; y < grid.y && b.error.empty(); ++y)
      for (unsigned x = 0; x < grid.x && b.error.empty(); ++x) {
        builtins.block_idx = {x, y, z};
        std::fill(dynamic.begin(), dynamic.end(), 0xffffffffu);
        run_block(b);
      }
  if (!b.error.empty())
    set_error(cudaErrorLaunchFailure,
              "emulated CUDA kernel launched at " + std::string(name) + ": " + b.error);
  running = outer;
  builtins = saved;
}

}  // namespace magneto::cuda_emu

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  using namespace magneto::cuda_emu;
  if (device != 0) return cudaErrorInvalidValue;
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = kMaxBlockThreads; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = kSharedPerBlock; return cudaSuccess;
    case cudaDevAttrWarpSize: *value = 32; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = kSms; return cudaSuccess;
    case cudaDevAttrMaxThreadsPerMultiProcessor: *value = kThreadsPerSm; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

cudaError_t cudaPeekAtLastError() { return magneto::cuda_emu::last_error; }

cudaError_t cudaGetLastError() {
  const cudaError_t err = magneto::cuda_emu::last_error;
  magneto::cuda_emu::last_error = cudaSuccess;
  return err;
}

// The message of the last failed launch stays valid until the next one fails.
const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    default: return magneto::cuda_emu::last_message.c_str();
  }
}
