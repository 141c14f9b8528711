// Moves the prior's batch outputs into the bank file off the Python thread.
//
// submit() copies a batch into a free slot of a host ring (a memcpy on the CPU; an asynchronous copy
// into pinned memory on a side stream on CUDA) and queues it. A writer thread waits for the copy,
// converts the rows to the bank's dtype and scatters them to their dataset indices in the mapped file;
// every `flush_seconds` it msyncs the rows written since the last flush and only then flags them done.
// So the next batch's forward overlaps the copy, the conversion and the disk writes, and the Python
// thread blocks only when every slot is in flight.
#pragma once

#include "bank_file.h"
#include "element_type.h"
#include "host_ring.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace rela {

struct WriterStats {
  int64_t rows_submitted = 0;  // handed to submit()
  int64_t rows_written = 0;    // scattered into the mapped file
  int64_t rows_durable = 0;    // msync'ed and flagged done
  int64_t flushes = 0;
  double seconds = 0.0;        // since the writer started
  double rows_per_s = 0.0;     // rows_written / seconds
};

class BankWriter {
 public:
  // `device` < 0: outputs arrive in host memory; >= 0: on that CUDA device (CUDA builds only).
  // `flush_seconds` <= 0 flushes after every batch (tests); larger values trade rows recomputed after
  // a crash for fewer msyncs.
  BankWriter(std::shared_ptr<BankFile> bank, int64_t batch_size, int num_slots, double flush_seconds, int device);
  // Writes and flushes what was already queued (valid rows: keeping them helps a resume), then joins.
  ~BankWriter();
  BankWriter(const BankWriter&) = delete;
  BankWriter& operator=(const BankWriter&) = delete;

  // Queues rows [0, rows) of `src` (batch_size x feature_dim, row-major, `src_type`) for dataset rows
  // indices[0..rows). On CUDA `src` must stay valid for work queued on `producer_stream` (see
  // DeviceToHostRing::fill). Blocks only while every slot is in flight. Rethrows a writer failure.
  void submit(const void* src, ElementType src_type, int64_t rows, const int64_t* indices, uintptr_t producer_stream);

  // Waits until every queued row is written, msync'ed and flagged; rethrows a writer failure.
  void finish();

  WriterStats stats() const;
  int64_t batch_size() const { return batch_size_; }
  int64_t feature_dim() const { return dim_; }
  int device() const { return device_; }

 private:
  struct Job {
    int slot = 0;
    ElementType src_type = ElementType::Float32;
    std::vector<int64_t> indices;
  };

  void run();
  void flush(std::vector<int64_t>& pending, int64_t& lo, int64_t& hi);
  void stop_and_join();

  std::shared_ptr<BankFile> bank_;
  int64_t batch_size_;
  int64_t dim_;
  int device_;
  std::chrono::duration<double> flush_interval_;
  std::unique_ptr<HostRing> ring_;
  std::chrono::steady_clock::time_point start_;

  mutable std::mutex mutex_;
  std::condition_variable work_ready_;   // writer waits: a job, or the end
  std::condition_variable slot_freed_;   // submit waits: a free slot
  std::vector<int> free_slots_;
  std::deque<Job> queue_;
  bool closing_ = false;      // no more jobs will come: drain, flush, exit
  bool writer_exited_ = false;
  std::exception_ptr error_;

  std::atomic<int64_t> rows_submitted_{0};
  std::atomic<int64_t> rows_written_{0};
  std::atomic<int64_t> rows_durable_{0};
  std::atomic<int64_t> flushes_{0};
  std::atomic<double> finished_seconds_{-1.0};

  std::thread thread_;  // last: starts once every other member exists
};

}  // namespace rela
