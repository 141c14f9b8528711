#include "bank_writer.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <limits>

namespace rela {
namespace {
constexpr int64_t kNoRow = -1;
}  // namespace

BankWriter::BankWriter(std::shared_ptr<BankFile> bank, int64_t batch_size, int num_slots, double flush_seconds,
                       int device)
    : bank_(std::move(bank)), batch_size_(batch_size), dim_(0), device_(device), flush_interval_(flush_seconds) {
  TORCH_CHECK(bank_ != nullptr, "bank must not be None");
  TORCH_CHECK(batch_size >= 1, "batch_size must be >= 1, got ", batch_size);
  TORCH_CHECK(num_slots >= 1, "num_slots must be >= 1, got ", num_slots);
  dim_ = bank_->feature_dim();
  // Slots hold the prior's output as it comes (float32 at most), the conversion happens in the writer.
  const size_t slot_bytes = static_cast<size_t>(batch_size) * static_cast<size_t>(dim_) * sizeof(float);
  ring_ = make_host_ring(device, num_slots, slot_bytes);
  for (int slot = num_slots - 1; slot >= 0; --slot) free_slots_.push_back(slot);
  start_ = std::chrono::steady_clock::now();
  thread_ = std::thread(&BankWriter::run, this);
}

BankWriter::~BankWriter() { stop_and_join(); }

void BankWriter::stop_and_join() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    closing_ = true;
  }
  work_ready_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void BankWriter::submit(const void* src, ElementType src_type, int64_t rows, const int64_t* indices,
                        uintptr_t producer_stream) {
  TORCH_CHECK(src != nullptr, "src must not be null");
  TORCH_CHECK(1 <= rows && rows <= batch_size_, "rows must be in [1, batch_size=", batch_size_, "], got ", rows);
  const int64_t num_rows = bank_->num_rows();
  for (int64_t i = 0; i < rows; ++i) {
    TORCH_CHECK(0 <= indices[i] && indices[i] < num_rows, "indices[", i, "] = ", indices[i],
                " is out of range for a bank of ", num_rows, " rows");
  }
  int slot = -1;
  {
    std::unique_lock<std::mutex> lock(mutex_);
    TORCH_CHECK(!closing_, "submit: the writer was already finished");
    slot_freed_.wait(lock, [&] { return !free_slots_.empty() || error_ != nullptr || writer_exited_; });
    if (error_ != nullptr) std::rethrow_exception(error_);
    TORCH_CHECK(!writer_exited_, "submit: the writer thread has exited");
    slot = free_slots_.back();
    free_slots_.pop_back();
  }
  try {
    ring_->fill(slot, src, static_cast<size_t>(rows * dim_) * element_size(src_type), producer_stream);
  } catch (...) {
    std::lock_guard<std::mutex> lock(mutex_);
    free_slots_.push_back(slot);
    throw;
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    queue_.push_back(Job{slot, src_type, std::vector<int64_t>(indices, indices + rows)});
  }
  rows_submitted_ += rows;
  work_ready_.notify_one();
}

void BankWriter::finish() {
  stop_and_join();
  std::lock_guard<std::mutex> lock(mutex_);
  if (error_ != nullptr) std::rethrow_exception(error_);
}

WriterStats BankWriter::stats() const {
  WriterStats stats;
  stats.rows_submitted = rows_submitted_.load();
  stats.rows_written = rows_written_.load();
  stats.rows_durable = rows_durable_.load();
  stats.flushes = flushes_.load();
  const double finished = finished_seconds_.load();
  stats.seconds = finished >= 0.0
                      ? finished
                      : std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  stats.rows_per_s = stats.seconds > 0.0 ? static_cast<double>(stats.rows_written) / stats.seconds : 0.0;
  return stats;
}

void BankWriter::flush(std::vector<int64_t>& pending, int64_t& lo, int64_t& hi) {
  if (pending.empty()) return;
  // Data first, flags after: a flag on disk always vouches for durable data.
  bank_->sync_rows(lo, hi);
  bank_->mark_done(pending);
  rows_durable_ += static_cast<int64_t>(pending.size());
  ++flushes_;
  pending.clear();
  lo = std::numeric_limits<int64_t>::max();
  hi = kNoRow;
}

void BankWriter::run() {
  std::vector<int64_t> pending;  // written, not yet durable
  int64_t lo = std::numeric_limits<int64_t>::max(), hi = kNoRow;
  auto last_flush = std::chrono::steady_clock::now();
  const auto flush_due = [&] {
    return !pending.empty() && std::chrono::steady_clock::now() - last_flush >= flush_interval_;
  };
  try {
    ring_->bind_current_thread();  // the rank's GPU, not GPU 0, before any CUDA call on this thread
    while (true) {
      Job job;
      bool have_job = false;
      bool closing = false;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        const auto woken = [&] { return !queue_.empty() || closing_; };
        if (pending.empty()) {
          work_ready_.wait(lock, woken);
        } else {
          // Wake up for a due flush even when the prior is slow to send the next batch.
          using Clock = std::chrono::steady_clock;
          const Clock::time_point due = last_flush + std::chrono::duration_cast<Clock::duration>(flush_interval_);
          work_ready_.wait_until(lock, due, woken);
        }
        if (!queue_.empty()) {
          job = std::move(queue_.front());
          queue_.pop_front();
          have_job = true;
        }
        closing = closing_ && queue_.empty();
      }
      if (have_job) {
        ring_->wait(job.slot);
        const int64_t rows = static_cast<int64_t>(job.indices.size());
        convert_rows(ring_->slot(job.slot), job.src_type, rows, dim_, bank_->rows(), bank_->dtype(),
                     job.indices.data());
        {
          std::lock_guard<std::mutex> lock(mutex_);
          free_slots_.push_back(job.slot);
        }
        slot_freed_.notify_one();
        rows_written_ += rows;
        for (int64_t row : job.indices) {
          lo = std::min(lo, row);
          hi = std::max(hi, row);
        }
        pending.insert(pending.end(), job.indices.begin(), job.indices.end());
      }
      if (closing || flush_due()) {
        flush(pending, lo, hi);
        last_flush = std::chrono::steady_clock::now();
      }
      if (closing && !have_job) break;
    }
  } catch (...) {
    std::lock_guard<std::mutex> lock(mutex_);
    error_ = std::current_exception();
  }
  finished_seconds_ = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  {
    std::lock_guard<std::mutex> lock(mutex_);
    writer_exited_ = true;
  }
  slot_freed_.notify_all();
}

}  // namespace rela
