// A ring of pinned host buffers filled from device memory on a side stream (CUDA runtime only, no torch
// headers, so nvcc compiles it in seconds). Built only when RELA_WITH_CUDA is defined.
#pragma once

#include "host_ring.h"

#include <cstddef>
#include <cstdint>
#include <memory>

namespace rela {

class DeviceToHostRing final : public HostRing {
 public:
  // `num_slots` pinned buffers of `slot_bytes` each, and a non-blocking side stream on `device`.
  DeviceToHostRing(int device, int num_slots, size_t slot_bytes);
  ~DeviceToHostRing() override;
  DeviceToHostRing(const DeviceToHostRing&) = delete;
  DeviceToHostRing& operator=(const DeviceToHostRing&) = delete;

  int num_slots() const override;
  uint8_t* slot(int index) const override;

  // Queues a copy of `bytes` of device memory at `src` into slot `index`, ordered after the work
  // already queued on `producer_stream` (a cudaStream_t; 0 = the legacy default stream). The producer
  // stream then waits for the copy (the host does not): `src` may be a CUDA graph's static output or a
  // block the caching allocator hands out again, and the next forward must not overwrite it before it
  // was read.
  void fill(int index, const void* src, size_t bytes, uintptr_t producer_stream) override;

  // Blocks the calling thread until slot `index`'s last copy has landed in host memory.
  void wait(int index) const override;

  // cudaSetDevice(device) on the calling thread (the writer thread, before its first wait()).
  void bind_current_thread() const override;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace rela
