#include "bank_file.h"

#include "checksum.h"

#include <c10/util/Exception.h>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>

namespace rela {
namespace {

constexpr char kMagic[8] = {'R', 'E', 'L', 'A', 'R', 'A', 'W', 'B'};
constexpr uint32_t kVersion = 1;
constexpr size_t kAlign = 4096;

// Byte offsets of the header fields (little-endian).
constexpr size_t kOffVersion = 8, kOffState = 12, kOffDtype = 16, kOffKeyLen = 20, kOffRows = 24,
                 kOffDim = 32, kOffDataOffset = 40, kOffFlagsOffset = 48, kOffFileBytes = 56,
                 kOffChecksum = 64, kOffHeaderHash = 72, kOffKey = 128;
static_assert(kOffKey + kBankMaxKeyBytes == kBankHeaderBytes, "header layout");

uint64_t round_up(uint64_t value, uint64_t alignment) { return (value + alignment - 1) / alignment * alignment; }

std::string errno_text() { return std::strerror(errno); }

template <typename T>
void put(uint8_t* buffer, size_t offset, T value) { std::memcpy(buffer + offset, &value, sizeof(T)); }

template <typename T>
T get(const uint8_t* buffer, size_t offset) { T value; std::memcpy(&value, buffer + offset, sizeof(T)); return value; }

// Serialises `header` and stores its hash (taken with the hash field zeroed) into both hash fields.
void serialise(BankHeader& header, uint8_t* buffer) {
  std::memset(buffer, 0, kBankHeaderBytes);
  std::memcpy(buffer, kMagic, sizeof(kMagic));
  put<uint32_t>(buffer, kOffVersion, header.version);
  put<uint32_t>(buffer, kOffState, static_cast<uint32_t>(header.state));
  put<uint32_t>(buffer, kOffDtype, static_cast<uint32_t>(header.dtype));
  put<uint32_t>(buffer, kOffKeyLen, static_cast<uint32_t>(header.key.size()));
  put<int64_t>(buffer, kOffRows, header.num_rows);
  put<int64_t>(buffer, kOffDim, header.feature_dim);
  put<uint64_t>(buffer, kOffDataOffset, header.data_offset);
  put<uint64_t>(buffer, kOffFlagsOffset, header.flags_offset);
  put<uint64_t>(buffer, kOffFileBytes, header.file_bytes);
  put<uint64_t>(buffer, kOffChecksum, header.checksum);
  std::memcpy(buffer + kOffKey, header.key.data(), header.key.size());
  header.stored_header_hash = header.actual_header_hash = xxh64(buffer, kBankHeaderBytes, 0);
  put<uint64_t>(buffer, kOffHeaderHash, header.stored_header_hash);
}

BankHeader parse(uint8_t* buffer, const std::string& path) {
  TORCH_CHECK(std::memcmp(buffer, kMagic, sizeof(kMagic)) == 0, "path: ", path,
              " is not a rela raw bank (bad magic bytes)");
  BankHeader header;
  header.version = get<uint32_t>(buffer, kOffVersion);
  TORCH_CHECK(header.version == kVersion, "path: ", path, " is a rela raw bank of format version ",
              header.version, ", this build reads version ", kVersion);
  header.state = static_cast<BankState>(get<uint32_t>(buffer, kOffState));
  header.dtype = static_cast<ElementType>(get<uint32_t>(buffer, kOffDtype));
  const uint32_t key_len = std::min<uint32_t>(get<uint32_t>(buffer, kOffKeyLen), kBankMaxKeyBytes);
  header.num_rows = get<int64_t>(buffer, kOffRows);
  header.feature_dim = get<int64_t>(buffer, kOffDim);
  header.data_offset = get<uint64_t>(buffer, kOffDataOffset);
  header.flags_offset = get<uint64_t>(buffer, kOffFlagsOffset);
  header.file_bytes = get<uint64_t>(buffer, kOffFileBytes);
  header.checksum = get<uint64_t>(buffer, kOffChecksum);
  header.stored_header_hash = get<uint64_t>(buffer, kOffHeaderHash);
  header.key.assign(reinterpret_cast<const char*>(buffer + kOffKey), key_len);
  put<uint64_t>(buffer, kOffHeaderHash, 0);
  header.actual_header_hash = xxh64(buffer, kBankHeaderBytes, 0);
  return header;
}

BankHeader read_header_fd(int fd, const std::string& path) {
  struct stat info;
  TORCH_CHECK(fstat(fd, &info) == 0, "path: cannot stat ", path, ": ", errno_text());
  std::vector<uint8_t> buffer(kBankHeaderBytes);
  const ssize_t got = pread(fd, buffer.data(), kBankHeaderBytes, 0);
  TORCH_CHECK(got >= 0, "path: cannot read ", path, ": ", errno_text());
  TORCH_CHECK(static_cast<size_t>(got) == kBankHeaderBytes, "path: ", path,
              " is not a rela raw bank (", info.st_size, " bytes, shorter than a header)");
  BankHeader header = parse(buffer.data(), path);
  header.actual_file_bytes = static_cast<uint64_t>(info.st_size);
  return header;
}

void write_header_fd(int fd, BankHeader& header, const std::string& path) {
  std::vector<uint8_t> buffer(kBankHeaderBytes);
  serialise(header, buffer.data());
  // One pwrite of the first page: the fields that change when the bank completes (state, checksum,
  // header hash) sit in its first sector, which disks write atomically.
  const ssize_t wrote = pwrite(fd, buffer.data(), kBankHeaderBytes, 0);
  TORCH_CHECK(wrote == static_cast<ssize_t>(kBankHeaderBytes), "path: cannot write the header of ", path, ": ",
              errno_text());
  TORCH_CHECK(fsync(fd) == 0, "path: fsync of ", path, " failed: ", errno_text());
}

void fsync_parent_directory(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  const std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
  UniqueFd dir_fd(open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  // Some filesystems refuse fsync on directories; the rename is then as durable as they make it.
  if (dir_fd.get() >= 0) fsync(dir_fd.get());
}

}  // namespace

UniqueFd::~UniqueFd() {
  if (fd_ >= 0) close(fd_);
}

UniqueFd& UniqueFd::operator=(UniqueFd&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) close(fd_);
    fd_ = other.release();
  }
  return *this;
}

SharedMapping::SharedMapping(int fd, size_t bytes, const std::string& path) : size_(bytes) {
  void* addr = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  TORCH_CHECK(addr != MAP_FAILED, "path: cannot map ", bytes, " bytes of ", path, ": ", errno_text());
  data_ = static_cast<uint8_t*>(addr);
}

SharedMapping::~SharedMapping() {
  if (data_ != nullptr) munmap(data_, size_);
}

SharedMapping::SharedMapping(SharedMapping&& other) noexcept : data_(other.data_), size_(other.size_) {
  other.data_ = nullptr;
  other.size_ = 0;
}

SharedMapping& SharedMapping::operator=(SharedMapping&& other) noexcept {
  if (this != &other) {
    if (data_ != nullptr) munmap(data_, size_);
    data_ = other.data_;
    size_ = other.size_;
    other.data_ = nullptr;
    other.size_ = 0;
  }
  return *this;
}

void SharedMapping::sync(size_t offset, size_t bytes, bool wait) const {
  if (bytes == 0) return;
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t begin = offset / page * page;
  const size_t end = std::min(size_, offset + bytes);
  TORCH_CHECK(msync(data_ + begin, end - begin, wait ? MS_SYNC : MS_ASYNC) == 0, "msync of bytes [", begin, ", ",
              end, ") failed: ", errno_text());
}

BankHeader read_bank_header(const std::string& path) {
  UniqueFd fd(open(path.c_str(), O_RDONLY | O_CLOEXEC));
  TORCH_CHECK(fd.get() >= 0, "path: cannot open ", path, ": ", errno_text());
  return read_header_fd(fd.get(), path);
}

void BankFile::create(const std::string& path, int64_t num_rows, int64_t feature_dim, ElementType dtype,
                      const std::string& key) {
  TORCH_CHECK(num_rows >= 1, "num_rows must be >= 1, got ", num_rows);
  TORCH_CHECK(feature_dim >= 1, "feature_dim must be >= 1, got ", feature_dim);
  TORCH_CHECK(is_storage_type(dtype), "dtype must be float32 or float16, got ", element_name(dtype));
  TORCH_CHECK(key.size() <= kBankMaxKeyBytes, "key must be at most ", kBankMaxKeyBytes, " bytes, got ",
              key.size());
  BankHeader header;
  header.version = kVersion;
  header.state = BankState::Building;
  header.dtype = dtype;
  header.num_rows = num_rows;
  header.feature_dim = feature_dim;
  header.key = key;
  header.data_offset = kBankHeaderBytes;
  header.flags_offset = round_up(header.data_offset + static_cast<uint64_t>(num_rows) * header.row_bytes(), kAlign);
  header.file_bytes = round_up(header.flags_offset + static_cast<uint64_t>(num_rows), kAlign);

  const std::string tmp = path + ".tmp." + std::to_string(getpid());
  UniqueFd fd(open(tmp.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  TORCH_CHECK(fd.get() >= 0, "path: cannot create ", tmp, ": ", errno_text());
  // Reserve the blocks now: writing a full disk through a mapping would end in SIGBUS mid-build.
  const off_t bytes = static_cast<off_t>(header.file_bytes);
  if (fallocate(fd.get(), 0, 0, bytes) != 0) {
    const int err = errno;
    if (err != EOPNOTSUPP && err != ENOSYS) {
      unlink(tmp.c_str());
      TORCH_CHECK(false, "path: cannot reserve ", header.file_bytes, " bytes for ", path, ": ", std::strerror(err));
    }
  }
  if (ftruncate(fd.get(), bytes) != 0) {
    const std::string reason = errno_text();
    unlink(tmp.c_str());
    TORCH_CHECK(false, "path: cannot size ", tmp, " to ", header.file_bytes, " bytes: ", reason);
  }
  write_header_fd(fd.get(), header, tmp);
  if (rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string reason = errno_text();
    unlink(tmp.c_str());
    TORCH_CHECK(false, "path: cannot rename ", tmp, " to ", path, ": ", reason);
  }
  fsync_parent_directory(path);
}

BankFile::BankFile(const std::string& path) : path_(path) {
  fd_ = UniqueFd(open(path.c_str(), O_RDWR | O_CLOEXEC));
  TORCH_CHECK(fd_.get() >= 0, "path: cannot open ", path, " for writing: ", errno_text());
  header_ = read_header_fd(fd_.get(), path);
  TORCH_CHECK(header_.header_intact(), "path: the header of ", path, " is corrupt (header checksum mismatch)");
  TORCH_CHECK(is_storage_type(header_.dtype), "path: ", path, " stores unknown dtype code ",
              static_cast<uint32_t>(header_.dtype));
  TORCH_CHECK(header_.actual_file_bytes >= header_.file_bytes, "path: ", path, " is truncated: ",
              header_.actual_file_bytes, " bytes, its header needs ", header_.file_bytes);
  mapping_ = SharedMapping(fd_.get(), header_.file_bytes, path);
}

int64_t BankFile::count_done() const {
  const uint8_t* f = flags();
  int64_t done = 0;
  for (int64_t i = 0; i < header_.num_rows; ++i) done += f[i] != 0;
  return done;
}

void BankFile::sync_rows(int64_t first, int64_t last) const {
  TORCH_CHECK(0 <= first && first <= last && last < header_.num_rows, "sync_rows: bad row range [", first, ", ",
              last, "] for ", header_.num_rows, " rows");
  const uint64_t row_bytes = header_.row_bytes();
  mapping_.sync(header_.data_offset + static_cast<uint64_t>(first) * row_bytes,
                static_cast<uint64_t>(last - first + 1) * row_bytes, /*wait=*/true);
}

void BankFile::mark_done(const std::vector<int64_t>& rows) {
  if (rows.empty()) return;
  // The row data reached the page cache (and the disk, via sync_rows) before any flag does.
  std::atomic_thread_fence(std::memory_order_release);
  uint8_t* f = mapping_.data() + header_.flags_offset;
  int64_t lo = rows.front(), hi = rows.front();
  for (int64_t r : rows) {
    TORCH_CHECK(0 <= r && r < header_.num_rows, "mark_done: row ", r, " out of range [0, ", header_.num_rows, ")");
    f[r] = 1;
    lo = std::min(lo, r);
    hi = std::max(hi, r);
  }
  // A lost flag only costs recomputing its row, so the flags are not waited for.
  mapping_.sync(header_.flags_offset + static_cast<uint64_t>(lo), static_cast<uint64_t>(hi - lo + 1), false);
}

uint64_t BankFile::compute_checksum(int threads) const {
  return chunked_checksum(rows(), static_cast<size_t>(header_.num_rows) * header_.row_bytes(), threads);
}

void BankFile::finalize(int threads) {
  const int64_t done = count_done();
  TORCH_CHECK(done == header_.num_rows, "finalize: ", header_.num_rows - done, " of ", header_.num_rows,
              " rows of ", path_, " are not done");
  const uint64_t checksum = compute_checksum(threads);
  mapping_.sync(0, mapping_.size(), /*wait=*/true);
  TORCH_CHECK(fsync(fd_.get()) == 0, "path: fsync of ", path_, " failed: ", errno_text());
  header_.state = BankState::Complete;
  header_.checksum = checksum;
  write_header_fd(fd_.get(), header_, path_);
}

void BankFile::reload_header() {
  BankHeader header = read_header_fd(fd_.get(), path_);
  TORCH_CHECK(header.header_intact(), "path: the header of ", path_, " is corrupt (header checksum mismatch)");
  TORCH_CHECK(header.num_rows == header_.num_rows && header.feature_dim == header_.feature_dim &&
                  header.dtype == header_.dtype && header.file_bytes == header_.file_bytes,
              "path: the layout of ", path_, " changed while it was open");
  header_ = std::move(header);
}

}  // namespace rela
