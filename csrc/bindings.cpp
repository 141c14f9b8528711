// The only file that knows about Python: converts tensors and dtypes, releases the GIL around
// everything that blocks, and exposes the C++ classes as rela._C.
#include "bank_file.h"
#include "bank_writer.h"
#include "checksum.h"
#include "host_ring.h"
#include "shard_plan.h"

#include <torch/extension.h>

#include <string>

namespace py = pybind11;
using namespace pybind11::literals;

namespace rela {
namespace {

ElementType element_type_of(at::ScalarType type, const char* what) {
  switch (type) {
    case at::kFloat: return ElementType::Float32;
    case at::kHalf: return ElementType::Float16;
    case at::kBFloat16: return ElementType::BFloat16;
    default: TORCH_CHECK(false, what, " must be float32, float16 or bfloat16, got ", type);
  }
}

ElementType storage_type_named(const std::string& name) {
  if (name == "float32") return ElementType::Float32;
  if (name == "float16") return ElementType::Float16;
  TORCH_CHECK(false, "dtype must be 'float32' or 'float16', got '", name, "'");
}

py::dict header_dict(const BankHeader& header) {
  const bool known_dtype = static_cast<uint32_t>(header.dtype) <= static_cast<uint32_t>(ElementType::BFloat16);
  return py::dict("version"_a = header.version,
                  "complete"_a = header.state == BankState::Complete,
                  "state"_a = static_cast<uint32_t>(header.state),
                  "dtype"_a = known_dtype ? element_name(header.dtype) : "unknown",
                  "num_rows"_a = header.num_rows,
                  "feature_dim"_a = header.feature_dim,
                  "key"_a = py::bytes(header.key),
                  "data_offset"_a = header.data_offset,
                  "flags_offset"_a = header.flags_offset,
                  "file_bytes"_a = header.file_bytes,
                  "actual_file_bytes"_a = header.actual_file_bytes,
                  "checksum"_a = header.checksum,
                  "header_intact"_a = header.header_intact());
}

void submit(BankWriter& writer, const at::Tensor& output, const at::Tensor& indices, int64_t rows,
            uintptr_t producer_stream) {
  TORCH_CHECK(output.dim() == 2 && output.size(0) == writer.batch_size() && output.size(1) == writer.feature_dim(),
              "output must have shape (", writer.batch_size(), ", ", writer.feature_dim(), "), got ", output.sizes());
  const ElementType src_type = element_type_of(output.scalar_type(), "output");
  if (writer.device() < 0) {
    TORCH_CHECK(output.device().is_cpu(), "output must be on the CPU for a CPU writer, got ", output.device());
  } else {
    TORCH_CHECK(output.device().is_cuda() && output.device().index() == writer.device(), "output must be on cuda:",
                writer.device(), ", got ", output.device());
  }
  TORCH_CHECK(indices.device().is_cpu() && indices.scalar_type() == at::kLong && indices.dim() == 1 &&
                  indices.size(0) >= rows,
              "indices must be a CPU int64 vector of at least ", rows, " elements, got ", indices.scalar_type(), " ",
              indices.sizes(), " on ", indices.device());
  const at::Tensor src = output.contiguous();
  const at::Tensor index = indices.contiguous();
  py::gil_scoped_release no_gil;
  writer.submit(src.data_ptr(), src_type, rows, index.data_ptr<int64_t>(), producer_stream);
}

}  // namespace
}  // namespace rela

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace rela;
  m.doc() = "rela's C++ extension: the raw feature bank (file, shard plan, ring + writer thread).";
  m.attr("with_cuda") = built_with_cuda();
  m.def("built_with_cuda", &built_with_cuda,
        "True when compiled with RELA_WITH_CUDA (setup.py found a toolkit of torch's CUDA major version): "
        "the writer then takes outputs on a CUDA device through a pinned ring.");

  m.def("xxh64", [](py::bytes data, uint64_t seed) {
    const std::string bytes = data;
    return xxh64(bytes.data(), bytes.size(), seed);
  }, "data"_a, "seed"_a = 0, "XXH64 of `data` (exposed to check the checksum against reference values).");

  m.def("read_bank_header", [](const std::string& path) {
    BankHeader header;
    {
      py::gil_scoped_release no_gil;
      header = read_bank_header(path);
    }
    return header_dict(header);
  }, "path"_a, "The header of the bank at `path` as a dict; RuntimeError if it is not a rela raw bank.");

  m.def("create_bank", [](const std::string& path, int64_t num_rows, int64_t feature_dim, const std::string& dtype,
                          const std::string& key) {
    const ElementType type = storage_type_named(dtype);
    py::gil_scoped_release no_gil;
    BankFile::create(path, num_rows, feature_dim, type, key);
  }, "path"_a, "num_rows"_a, "feature_dim"_a, "dtype"_a, "key"_a,
        "Writes a new bank (every row pending) atomically: temporary name, fsync, rename.");

  m.def("shard_range", &ShardPlan::shard_range, "num_rows"_a, "rank"_a, "world_size"_a,
        "The block [begin, end) of rows that `rank` owns.");

  py::class_<BankFile, std::shared_ptr<BankFile>>(m, "BankFile")
      .def(py::init<const std::string&>(), "path"_a, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("path", &BankFile::path)
      .def_property_readonly("header", [](const BankFile& bank) { return header_dict(bank.header()); })
      .def("count_done", &BankFile::count_done, py::call_guard<py::gil_scoped_release>())
      .def("done_flags", [](const BankFile& bank) {
        // A copy: the mapping's flags keep changing while other ranks write.
        return torch::from_blob(const_cast<uint8_t*>(bank.flags()), {bank.num_rows()}, at::kByte).clone();
      })
      .def("checksum", &BankFile::compute_checksum, "threads"_a, py::call_guard<py::gil_scoped_release>())
      .def("finalize", &BankFile::finalize, "threads"_a, py::call_guard<py::gil_scoped_release>())
      .def("reload_header", &BankFile::reload_header, py::call_guard<py::gil_scoped_release>());

  py::class_<ShardPlan>(m, "ShardPlan")
      .def(py::init([](const BankFile& bank, int64_t rank, int64_t world_size, int64_t batch_size) {
             return std::make_unique<ShardPlan>(bank.flags(), bank.num_rows(), rank, world_size, batch_size);
           }),
           "bank"_a, "rank"_a, "world_size"_a, "batch_size"_a)
      .def_property_readonly("shard_begin", &ShardPlan::shard_begin)
      .def_property_readonly("shard_end", &ShardPlan::shard_end)
      .def_property_readonly("batch_size", &ShardPlan::batch_size)
      .def_property_readonly("pending_rows", &ShardPlan::pending_rows)
      .def_property_readonly("num_batches", &ShardPlan::num_batches)
      .def("batch", [](const ShardPlan& plan, int64_t batch) {
        at::Tensor indices = torch::empty({plan.batch_size()}, at::kLong);
        const int64_t valid = plan.fill_batch(batch, indices.data_ptr<int64_t>());
        return py::make_tuple(indices, valid);
      }, "batch"_a, "(indices int64 (batch_size,), valid rows): the padding repeats the last valid index.");

  py::class_<BankWriter>(m, "BankWriter")
      .def(py::init<std::shared_ptr<BankFile>, int64_t, int, double, int>(), "bank"_a, "batch_size"_a,
           "num_slots"_a, "flush_seconds"_a, "device"_a, py::call_guard<py::gil_scoped_release>())
      .def("submit", &submit, "output"_a, "indices"_a, "rows"_a, "producer_stream"_a = 0,
           "Queues rows [0, rows) of output (batch_size, feature_dim) for dataset rows indices[:rows].")
      .def("finish", &BankWriter::finish, py::call_guard<py::gil_scoped_release>())
      .def("stats", [](const BankWriter& writer) {
        const WriterStats s = writer.stats();
        return py::dict("rows_submitted"_a = s.rows_submitted, "rows_written"_a = s.rows_written,
                        "rows_durable"_a = s.rows_durable, "flushes"_a = s.flushes, "seconds"_a = s.seconds,
                        "rows_per_s"_a = s.rows_per_s);
      });
}
