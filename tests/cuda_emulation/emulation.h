// Just enough of CUDA to run the kernels of csrc/cuda on the CPU, for the tests:
// tests/cuda_emulation/__init__.py compiles those sources with this header in place
// of the CUDA headers (x86-64 only). Every CUDA thread of a thread block is a fiber
// on one OS thread that runs until it returns or waits at __syncthreads or a warp
// shuffle (run_block says in which order). Blocks run one after another, first to
// last or last to first, and threads within a block likewise by priority, so a
// missing barrier or a race between blocks gives different results in the two
// orders. Device-side asserts, a barrier reached after other threads of the block
// returned, a shuffle without all 32 lanes, more than 48 KiB of dynamic shared memory
// without the opt-in, and launches beyond CUDA's limits raise errors; built with
// AddressSanitizer, any access outside a tensor does. It checks the kernels' logic,
// not the GPU's memory model, the rounding of its math functions or its speed.
#pragma once
#include <c10/core/Device.h>
#include <c10/util/Exception.h>
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// The running thread's coordinates, as CUDA's built-in variables.
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static  // one instance per kernel instantiation: blocks run one at a time

#undef CUDA_KERNEL_ASSERT
#define CUDA_KERNEL_ASSERT(cond) \
  do {                           \
    if (!(cond)) ::sk_emu::device_assert_failed(#cond, __FILE__, __LINE__); \
  } while (0)

namespace sk_emu {

struct DeviceAssert : std::runtime_error {
  using std::runtime_error::runtime_error;
};

[[noreturn]] inline void device_assert_failed(const char* cond, const char* file, int line) {
  throw DeviceAssert(std::string("device-side assert failed: ") + cond + " at " + file + ":" + std::to_string(line));
}

enum class State { Runnable, AtSyncthreads, AtShuffle, Done };

// Saves the callee-saved registers on the current stack and its pointer in *save, then resumes the stack at
// `load` (what ucontext's swapcontext does, without its system call for the signal mask: a hundred times faster).
extern "C" void sk_emu_switch(void** save, void* load);
asm(R"(
  .text
  .p2align 4
  .weak sk_emu_switch
  .hidden sk_emu_switch
  .type sk_emu_switch, @function
sk_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size sk_emu_switch, .-sk_emu_switch
)");

struct Fiber {
  void* sp = nullptr;
  std::unique_ptr<char[]> stack;
  State state = State::Done;
};

constexpr size_t kStackBytes = 64 * 1024;
constexpr int kWarp = 32;

struct Scheduler {
  std::vector<Fiber> fibers;
  void* host = nullptr;  // the host's stack while a fiber runs
  int current = 0;
  const std::function<void()>* body = nullptr;
  std::exception_ptr error;
  std::vector<uint64_t> lanes;  // shuffle values, one slot per thread
  std::vector<int> at_shuffle, done_in_warp;  // per warp of the running block
  std::vector<unsigned char> dynamic_shared;
  bool reverse = false;  // run blocks, and threads within a block, last first
  int opted_in_shared = 48 * 1024;  // the dynamic shared memory the next launch may use
};

inline Scheduler scheduler;

inline void set_thread(int i) {
  scheduler.current = i;
  threadIdx = dim3(i % blockDim.x, i / blockDim.x % blockDim.y, i / (blockDim.x * blockDim.y));
}

[[noreturn]] inline void fiber_main() {
  try {
    (*scheduler.body)();
  } catch (...) {
    if (!scheduler.error) scheduler.error = std::current_exception();
  }
  Fiber& f = scheduler.fibers[scheduler.current];
  f.state = State::Done;
  sk_emu_switch(&f.sp, scheduler.host);  // never resumed
  __builtin_unreachable();
}

// A fiber that starts in fiber_main the first time it is switched to.
inline void start(Fiber& f) {
  if (!f.stack) f.stack.reset(new char[kStackBytes]);
#if defined(__SANITIZE_ADDRESS__)
  ASAN_UNPOISON_MEMORY_REGION(f.stack.get(), kStackBytes);  // the redzones of earlier fibers' frames
#endif
  auto** sp = reinterpret_cast<void**>(reinterpret_cast<uintptr_t>(f.stack.get() + kStackBytes) & ~uintptr_t(15));
  *--sp = nullptr;                                   // fiber_main's return address (it never returns)
  *--sp = reinterpret_cast<void*>(&fiber_main);      // where sk_emu_switch returns to
  for (int i = 0; i < 6; ++i) *--sp = nullptr;       // the six registers it restores
  f.sp = sp;
  f.state = State::Runnable;
}

inline void wait(State state) {
  Fiber& f = scheduler.fibers[scheduler.current];
  f.state = state;
  sk_emu_switch(&f.sp, scheduler.host);
  asm volatile("" ::: "memory");  // shared memory may have changed: no value of it stays in a register
}

// One block on fibers. The first runnable thread in priority order (the lowest index first, the highest with
// `reverse`) runs until it waits or returns. The last thread to reach a barrier releases its group (the block, or
// the warp of a shuffle), whose first thread in that order runs next: released threads run ahead of the others up
// to their next barrier, as warps of a real block may.
inline void run_block(int threads) {
  Scheduler& s = scheduler;
  for (int i = 0; i < threads; ++i) start(s.fibers[i]);
  const int warps = (threads + kWarp - 1) / kWarp;
  s.at_shuffle.assign(warps, 0);
  s.done_in_warp.assign(warps, 0);
  int done = 0, at_sync = 0;
  auto order = [&](int k) { return s.reverse ? threads - 1 - k : k; };  // thread <-> position, both ways
  for (int k = 0; k < threads;) {
    const int i = order(k);
    Fiber& f = s.fibers[i];
    if (f.state != State::Runnable) {
      ++k;
      continue;
    }
    set_thread(i);
    sk_emu_switch(&s.host, f.sp);
    if (s.error) std::rethrow_exception(s.error);
    const int w = i / kWarp, lanes = std::min(kWarp, threads - w * kWarp);
    done += f.state == State::Done;
    s.done_in_warp[w] += f.state == State::Done;
    at_sync += f.state == State::AtSyncthreads;
    s.at_shuffle[w] += f.state == State::AtShuffle;
    if (at_sync > 0 && at_sync + done == threads) {
      TORCH_CHECK(done == 0, "emulated CUDA: __syncthreads() reached after ", done, " threads of the block returned");
      for (int t = 0; t < threads; ++t) s.fibers[t].state = State::Runnable;
      at_sync = 0;
      k = 0;
    } else if (s.at_shuffle[w] > 0 && s.at_shuffle[w] + s.done_in_warp[w] == lanes) {
      TORCH_CHECK(s.done_in_warp[w] == 0 && lanes == kWarp, "emulated CUDA: a full-mask shuffle without all 32 lanes");
      for (int t = w * kWarp; t < w * kWarp + kWarp; ++t) s.fibers[t].state = State::Runnable;
      s.at_shuffle[w] = 0;
      k = std::min(order(w * kWarp), order(w * kWarp + kWarp - 1));
    }
  }
  TORCH_CHECK(done == threads, "emulated CUDA: the block's threads wait at different barriers (deadlock)");
}

// kernel<<<grid, block, shared_bytes, stream>>>(args...): `body` runs the kernel for the current thread.
inline void run(dim3 grid, dim3 block, size_t shared_bytes, const std::function<void()>& body) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  TORCH_CHECK(grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && threads >= 1, "emulated CUDA: empty launch (grid ",
              grid.x, "x", grid.y, "x", grid.z, ", block ", block.x, "x", block.y, "x", block.z, ")");
  TORCH_CHECK(grid.x <= 2147483647u && grid.y <= 65535 && grid.z <= 65535, "emulated CUDA: grid ", grid.x, "x",
              grid.y, "x", grid.z, " beyond CUDA's limits");
  TORCH_CHECK(threads <= 1024 && block.z <= 64, "emulated CUDA: block of ", threads, " threads");
  TORCH_CHECK(shared_bytes <= size_t(scheduler.opted_in_shared), "emulated CUDA: ", shared_bytes,
              " bytes of dynamic shared memory, ", scheduler.opted_in_shared, " allowed (cudaFuncSetAttribute)");
  scheduler.opted_in_shared = 48 * 1024;
  scheduler.error = nullptr;
  scheduler.body = &body;
  if (scheduler.fibers.size() < threads) {
    scheduler.fibers.resize(threads);
    scheduler.lanes.resize(threads);
  }
  scheduler.dynamic_shared.assign(shared_bytes, 0xff);  // not zeroed, as on the GPU
  gridDim = grid;
  blockDim = block;
  const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
  for (uint64_t k = 0; k < blocks; ++k) {
    const uint64_t b = scheduler.reverse ? blocks - 1 - k : k;
    blockIdx = dim3(b % grid.x, b / grid.x % grid.y, b / (uint64_t(grid.x) * grid.y));
    run_block(static_cast<int>(threads));
  }
}

template <typename Body>
struct Launch {
  dim3 grid, block;
  size_t shared_bytes;
  Body body;
  template <typename... Args>
  void operator()(Args... args) {
    run(grid, block, shared_bytes, [&] { body(args...); });
  }
};

// What tests/cuda_emulation.py writes for `kernel<<<grid, block, shared, stream>>>`.
template <typename Stream, typename Body>
Launch<Body> launch(dim3 grid, dim3 block, size_t shared_bytes, Stream, Body body) {
  return {grid, block, shared_bytes, body};
}

inline unsigned char* dynamic_shared() { return scheduler.dynamic_shared.data(); }

}  // namespace sk_emu

template <typename T>
T atomicAdd(T* address, T value) {  // fibers switch only at barriers: a plain add is atomic here
  const T old = *address;
  *address = old + value;
  return old;
}

inline void __syncthreads() { sk_emu::wait(sk_emu::State::AtSyncthreads); }

template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  static_assert(sizeof(T) <= sizeof(uint64_t));
  TORCH_CHECK(mask == 0xffffffffu, "emulated CUDA: __shfl_down_sync supports the full mask only");
  auto& lanes = sk_emu::scheduler.lanes;
  const int me = sk_emu::scheduler.current, lane = me % sk_emu::kWarp;
  std::memcpy(&lanes[me], &value, sizeof(T));
  sk_emu::wait(sk_emu::State::AtShuffle);  // every lane has written
  T out = value;
  if (lane % width + delta < unsigned(width)) std::memcpy(&out, &lanes[me + delta], sizeof(T));
  sk_emu::wait(sk_emu::State::AtShuffle);  // every lane has read
  return out;
}

inline void sincospif(float x, float* s, float* c) {
  *s = static_cast<float>(std::sin(M_PI * x));
  *c = static_cast<float>(std::cos(M_PI * x));
}

inline void sincospi(double x, double* s, double* c) {
  *s = std::sin(M_PI * x);
  *c = std::cos(M_PI * x);
}

// The host API the sources call, for one device of 132 multiprocessors (an H100).
enum cudaError_t { cudaSuccess = 0 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) {
  *value = 132;
  return cudaSuccess;
}

// The opt-in into more than 48 KiB of dynamic shared memory (up to an H100's 227 KiB), for the next launch.
template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel, cudaFuncAttribute, int bytes) {
  TORCH_CHECK(bytes <= 227 * 1024, "emulated CUDA: at most 227 KiB of shared memory per block, asked for ", bytes);
  sk_emu::scheduler.opted_in_shared = bytes;
  return cudaSuccess;
}

#define C10_CUDA_CHECK(expr) TORCH_CHECK((expr) == cudaSuccess, "emulated CUDA call failed: " #expr)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
struct CUDAStream {};
inline CUDAStream getCurrentCUDAStream() { return {}; }
}  // namespace c10::cuda
