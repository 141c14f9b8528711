#include "cuda_copy.h"

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#include <vector>

namespace rela {
namespace {

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("DeviceToHostRing: ") + what + " failed: " + cudaGetErrorString(status));
  }
}

// Makes `device` current for a scope and restores the caller's device after.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

}  // namespace

struct DeviceToHostRing::Impl {
  int device = 0;
  size_t slot_bytes = 0;
  cudaStream_t side_stream = nullptr;
  std::vector<void*> buffers;          // pinned host memory
  std::vector<cudaEvent_t> produced;   // recorded on the producer stream
  std::vector<cudaEvent_t> copied;     // recorded on the side stream

  ~Impl() {
    // Destructors must not throw: errors here (a dying context at exit) are ignored.
    for (cudaEvent_t event : copied) cudaEventSynchronize(event);
    for (cudaEvent_t event : copied) cudaEventDestroy(event);
    for (cudaEvent_t event : produced) cudaEventDestroy(event);
    for (void* buffer : buffers) cudaFreeHost(buffer);
    if (side_stream != nullptr) cudaStreamDestroy(side_stream);
  }
};

DeviceToHostRing::DeviceToHostRing(int device, int num_slots, size_t slot_bytes) : impl_(std::make_unique<Impl>()) {
  if (num_slots < 1) throw std::invalid_argument("DeviceToHostRing: num_slots must be >= 1");
  DeviceGuard guard(device);
  impl_->device = device;
  impl_->slot_bytes = slot_bytes;
  check(cudaStreamCreateWithFlags(&impl_->side_stream, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
  for (int i = 0; i < num_slots; ++i) {
    void* buffer = nullptr;
    check(cudaHostAlloc(&buffer, slot_bytes, cudaHostAllocDefault), "cudaHostAlloc (pinned ring slot)");
    impl_->buffers.push_back(buffer);
    cudaEvent_t produced = nullptr, copied = nullptr;
    check(cudaEventCreateWithFlags(&produced, cudaEventDisableTiming), "cudaEventCreateWithFlags");
    impl_->produced.push_back(produced);
    check(cudaEventCreateWithFlags(&copied, cudaEventDisableTiming), "cudaEventCreateWithFlags");
    impl_->copied.push_back(copied);
  }
}

DeviceToHostRing::~DeviceToHostRing() = default;

int DeviceToHostRing::num_slots() const { return static_cast<int>(impl_->buffers.size()); }

uint8_t* DeviceToHostRing::slot(int index) const { return static_cast<uint8_t*>(impl_->buffers.at(index)); }

void DeviceToHostRing::fill(int index, const void* src, size_t bytes, uintptr_t producer_stream) {
  if (bytes > impl_->slot_bytes) throw std::invalid_argument("DeviceToHostRing: copy larger than a slot");
  DeviceGuard guard(impl_->device);
  auto producer = reinterpret_cast<cudaStream_t>(producer_stream);
  cudaEvent_t produced = impl_->produced.at(index), copied = impl_->copied.at(index);
  check(cudaEventRecord(produced, producer), "cudaEventRecord (producer)");
  check(cudaStreamWaitEvent(impl_->side_stream, produced, 0), "cudaStreamWaitEvent (side stream)");
  check(cudaMemcpyAsync(impl_->buffers[index], src, bytes, cudaMemcpyDeviceToHost, impl_->side_stream),
        "cudaMemcpyAsync (device to pinned host)");
  check(cudaEventRecord(copied, impl_->side_stream), "cudaEventRecord (side stream)");
  check(cudaStreamWaitEvent(producer, copied, 0), "cudaStreamWaitEvent (producer)");
}

void DeviceToHostRing::bind_current_thread() const { check(cudaSetDevice(impl_->device), "cudaSetDevice"); }

void DeviceToHostRing::wait(int index) const {
  check(cudaEventSynchronize(impl_->copied.at(index)), "cudaEventSynchronize");
}

}  // namespace rela
