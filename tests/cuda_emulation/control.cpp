// The emulation's one setting, as an op: sk_emulated_cuda::set_reverse(bool).
#include <torch/library.h>

#include "emulation.h"

TORCH_LIBRARY_FRAGMENT(sk_emulated_cuda, m) {
  m.def("set_reverse(bool reverse) -> ()", [](bool reverse) { sk_emu::scheduler.reverse = reverse; });
}
