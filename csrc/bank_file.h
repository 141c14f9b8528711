// The raw bank file: one file that several processes map and write at once.
//
//   [0, 4096)                    header: magic, version, state, dtype, shape, key, checksum, header hash
//   [data_offset, + N * D * s)   rows, row-major, at their dataset index (data_offset = 4096)
//   [flags_offset, + N)          one byte per row, 1 once the row's data is durable (page aligned)
//
// Crash safety: a new file is built under a temporary name and renamed into place; a row's flag is
// set only after its data was msync'ed (so a flagged row is never garbage after a crash or SIGKILL);
// the 'complete' state, with the rows' checksum, is written last, after every row is flagged and the
// file fsync'ed. One byte per row (not one bit) lets processes flag disjoint rows without read-modify-
// write races on shared bytes.
#pragma once

#include "element_type.h"

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace rela {

enum class BankState : uint32_t { Building = 0, Complete = 1 };

constexpr size_t kBankHeaderBytes = 4096;
constexpr size_t kBankMaxKeyBytes = 3968;  // what fits in the header after the fixed fields

struct BankHeader {
  uint32_t version = 0;
  BankState state = BankState::Building;
  ElementType dtype = ElementType::Float32;
  int64_t num_rows = 0;
  int64_t feature_dim = 0;
  uint64_t data_offset = 0;
  uint64_t flags_offset = 0;
  uint64_t file_bytes = 0;       // what the layout needs
  uint64_t checksum = 0;         // of the rows region; set when complete
  uint64_t stored_header_hash = 0;
  uint64_t actual_header_hash = 0;  // recomputed on read: differs from the stored one if the header is corrupt
  uint64_t actual_file_bytes = 0;   // the file's size on disk
  std::string key;

  bool header_intact() const { return stored_header_hash == actual_header_hash; }
  uint64_t row_bytes() const { return static_cast<uint64_t>(feature_dim) * element_size(dtype); }
};

// Reads a bank's header. Fails (TORCH_CHECK) if the file cannot be read or is not a rela raw bank.
BankHeader read_bank_header(const std::string& path);

// Owns a file descriptor.
class UniqueFd {
 public:
  explicit UniqueFd(int fd = -1) : fd_(fd) {}
  ~UniqueFd();
  UniqueFd(UniqueFd&& other) noexcept : fd_(other.release()) {}
  UniqueFd& operator=(UniqueFd&& other) noexcept;
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  int get() const { return fd_; }
  int release() { int fd = fd_; fd_ = -1; return fd; }

 private:
  int fd_;
};

// Owns a shared read-write mapping of a whole file.
class SharedMapping {
 public:
  SharedMapping() = default;
  SharedMapping(int fd, size_t bytes, const std::string& path);
  ~SharedMapping();
  SharedMapping(SharedMapping&& other) noexcept;
  SharedMapping& operator=(SharedMapping&& other) noexcept;
  SharedMapping(const SharedMapping&) = delete;
  SharedMapping& operator=(const SharedMapping&) = delete;
  uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  // msync(MS_SYNC or MS_ASYNC) of [offset, offset + bytes), widened to whole pages.
  void sync(size_t offset, size_t bytes, bool wait) const;

 private:
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

class BankFile {
 public:
  // Writes a new bank with every row pending. Built under a temporary name, fsync'ed and renamed onto
  // `path`, so `path` never names a half-initialised file. Fails if `path` exists.
  static void create(const std::string& path, int64_t num_rows, int64_t feature_dim, ElementType dtype,
                     const std::string& key);

  // Maps an existing bank for reading and writing.
  explicit BankFile(const std::string& path);

  const std::string& path() const { return path_; }
  const BankHeader& header() const { return header_; }
  int64_t num_rows() const { return header_.num_rows; }
  int64_t feature_dim() const { return header_.feature_dim; }
  ElementType dtype() const { return header_.dtype; }
  uint8_t* rows() const { return mapping_.data() + header_.data_offset; }
  const uint8_t* flags() const { return mapping_.data() + header_.flags_offset; }

  int64_t count_done() const;
  // Flushes the data of rows [first, last] to disk and waits.
  void sync_rows(int64_t first, int64_t last) const;
  // Flags rows as done. Call only after their data is durable (sync_rows).
  void mark_done(const std::vector<int64_t>& rows);
  uint64_t compute_checksum(int threads) const;
  // Once every row is flagged: checksum the rows, fsync, then write the 'complete' header and fsync
  // again. Only one process may call it (rank 0, after a barrier).
  void finalize(int threads);
  // Re-reads the header (after another process finalised the bank).
  void reload_header();

 private:
  std::string path_;
  UniqueFd fd_;
  BankHeader header_;
  SharedMapping mapping_;
};

}  // namespace rela
