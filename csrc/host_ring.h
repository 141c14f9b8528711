// Where batch outputs wait between the prior and the writer thread: a ring of host buffers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

namespace rela {

class HostRing {
 public:
  virtual ~HostRing() = default;
  virtual int num_slots() const = 0;
  virtual uint8_t* slot(int index) const = 0;
  // Starts filling slot `index` with `bytes` from `src`: host memory for the CPU ring (copied before
  // returning), device memory produced on `producer_stream` for the CUDA ring (copied asynchronously).
  virtual void fill(int index, const void* src, size_t bytes, uintptr_t producer_stream) = 0;
  // Blocks the calling thread until slot `index`'s last fill has landed.
  virtual void wait(int index) const = 0;
  // Called first on the thread that will wait() on the ring: the CUDA ring makes its device current
  // there, since a fresh thread's current device is 0 and its first runtime call would open a context
  // on GPU 0 (on every rank of a multi-GPU node). Nothing to do for the CPU ring.
  virtual void bind_current_thread() const {}
};

// device < 0: pageable buffers filled by memcpy. device >= 0: pinned buffers filled on a side stream of
// that CUDA device (CUDA builds only; see built_with_cuda()).
std::unique_ptr<HostRing> make_host_ring(int device, int num_slots, size_t slot_bytes);

bool built_with_cuda();

}  // namespace rela
