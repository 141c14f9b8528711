#include "host_ring.h"

#ifdef RELA_WITH_CUDA
#include "cuda_copy.h"
#endif

#include <c10/util/Exception.h>

#include <cstring>
#include <vector>

namespace rela {
namespace {

// The CPU path goes through the same ring and writer thread as the CUDA one, so tests on the CPU
// exercise the hand-off; a memcpy of one batch is small next to the prior's forward.
class CpuHostRing final : public HostRing {
 public:
  CpuHostRing(int num_slots, size_t slot_bytes) : buffers_(static_cast<size_t>(num_slots)) {
    for (auto& buffer : buffers_) buffer.resize(slot_bytes);
  }
  int num_slots() const override { return static_cast<int>(buffers_.size()); }
  uint8_t* slot(int index) const override { return const_cast<uint8_t*>(buffers_.at(index).data()); }
  void fill(int index, const void* src, size_t bytes, uintptr_t /*producer_stream*/) override {
    TORCH_CHECK(bytes <= buffers_.at(index).size(), "fill: ", bytes, " bytes exceed a slot of ",
                buffers_.at(index).size());
    std::memcpy(buffers_[index].data(), src, bytes);
  }
  void wait(int /*index*/) const override {}

 private:
  std::vector<std::vector<uint8_t>> buffers_;
};

}  // namespace

std::unique_ptr<HostRing> make_host_ring(int device, int num_slots, size_t slot_bytes) {
  TORCH_CHECK(num_slots >= 1, "num_slots must be >= 1, got ", num_slots);
  if (device < 0) return std::make_unique<CpuHostRing>(num_slots, slot_bytes);
#ifdef RELA_WITH_CUDA
  return std::make_unique<DeviceToHostRing>(device, num_slots, slot_bytes);
#else
  TORCH_CHECK(false, "device: rela._C was built without CUDA, cannot take outputs on cuda:", device,
              " (rebuild with a CUDA toolkit: pip install --no-build-isolation -e .)");
#endif
}

bool built_with_cuda() {
#ifdef RELA_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace rela
