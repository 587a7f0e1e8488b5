// Python bindings of the C++ core (module sllm_store._C).
//
// Errors: sllm::Error is translated into the matching class of sllm_store.errors; a Ctrl-C
// during a load cancels the workers, joins them and re-raises KeyboardInterrupt.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <functional>
#include <map>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "common/errors.h"
#include "device/cuda_driver.h"
#include "device/cuda_ipc.h"
#include "device/cuda_vmm.h"
#include "device/device.h"
#include "memory/host_buffer.h"
#include "memory/pinned_arena.h"
#include "memory/pool_cache.h"
#include "format/checksum.h"
#include "format/codec.h"
#include "io/file_reader.h"
#include "io/cache_file.h"
#include "memory/malloc_offset.h"
#include "io/page_cache.h"
#include "pipeline/copier.h"
#include "pipeline/staged_copier.h"
#include "pipeline/loader.h"
#include "pipeline/progress.h"

namespace py = pybind11;
using namespace sllm;

namespace {

const char* python_error_class(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::kFormat: return "FormatError";
    case ErrorKind::kMissing: return "MissingFileError";
    case ErrorKind::kTruncated: return "TruncatedFileError";
    case ErrorKind::kChecksum: return "ChecksumError";
    case ErrorKind::kRead: return "ReadError";
    case ErrorKind::kDevice: return "DeviceError";
    case ErrorKind::kOutOfMemory: return "OutOfMemoryError";
    case ErrorKind::kCancelled: return "LoadCancelledError";
  }
  return "SllmStoreError";
}

py::buffer_info contiguous_bytes(const py::buffer& b) {
  py::buffer_info info = b.request();
  // Only C-contiguous buffers: strides must describe a dense row-major layout.
  py::ssize_t expected = info.itemsize;
  for (py::ssize_t i = info.ndim - 1; i >= 0; --i) {
    if (info.shape[i] > 1 && info.strides[i] != expected)
      throw py::value_error("buffer must be C-contiguous");
    expected *= info.shape[i];
  }
  return info;
}

// group_bytes / ungroup_bytes of a Python buffer, as new bytes.
py::bytes regrouped(const py::buffer& b, int group, void (*fn)(const char*, char*, size_t, int)) {
  py::buffer_info info = contiguous_bytes(b);
  size_t n = static_cast<size_t>(info.size * info.itemsize);
  std::string out(n, '\0');
  {
    py::gil_scoped_release nogil;
    fn(static_cast<const char*>(info.ptr), out.data(), n, group);
  }
  return py::bytes(out);
}

using ChunkTuple = std::tuple<int, uint64_t, uint64_t, std::optional<uint64_t>>;
using SegmentTuple = std::tuple<int, uint64_t, int, uint64_t, uint64_t>;
using DestTuple = std::tuple<std::string, uint64_t, uint64_t>;
using PieceTuple = std::tuple<uint64_t, int, uint64_t, uint64_t>;  // chunk_offset, dest, dest_offset, length

std::vector<StagedCopier::Piece> to_pieces(const std::vector<PieceTuple>& pieces) {
  std::vector<StagedCopier::Piece> ps;
  ps.reserve(pieces.size());
  for (const auto& [coff, dest, doff, n] : pieces) ps.push_back(StagedCopier::Piece{coff, dest, doff, n});
  return ps;
}

using EncodingTuple = std::optional<std::tuple<uint64_t, uint64_t, int, int>>;

py::dict run_load_py(const std::vector<std::string>& files, const std::vector<ChunkTuple>& chunks,
                     const std::vector<SegmentTuple>& segments, const std::vector<DestTuple>& dests,
                     int num_threads, const std::string& io_mode, bool verify,
                     int buffers_per_thread, const std::vector<EncodingTuple>& encodings,
                     std::shared_ptr<Progress> progress) {
  if (!encodings.empty() && encodings.size() != chunks.size())
    throw py::value_error("encodings must be empty or give one entry per chunk");
  LoadPlan plan;
  plan.files = files;
  plan.chunks.reserve(chunks.size());
  for (const auto& [file, offset, length, checksum] : chunks) {
    ChunkSpec c;
    c.file = file;
    c.offset = offset;
    c.length = length;
    c.has_checksum = checksum.has_value();
    c.checksum = checksum.value_or(0);
    if (!encodings.empty() && encodings[plan.chunks.size()].has_value()) {
      const auto& [stored_offset, stored_length, codec, group] = *encodings[plan.chunks.size()];
      c.encoded = true;
      c.stored_offset = stored_offset;
      c.stored_length = stored_length;
      c.codec = codec;
      c.group = group;
      if (stored_offset % kDirectAlignment != 0)
        throw py::value_error("stored chunks must start at a multiple of 4096");
    }
    plan.chunks.push_back(c);
  }
  plan.segments.reserve(segments.size());
  for (const auto& [chunk, chunk_offset, dest, dest_offset, length] : segments)
    plan.segments.push_back(Segment{chunk, chunk_offset, dest, dest_offset, length});
  for (const auto& [device, ptr, size] : dests)
    plan.dests.push_back(Destination{make_device(device), reinterpret_cast<char*>(ptr), size});

  LoadOptions options;
  options.num_threads = num_threads;
  if (io_mode == "direct") {
    options.io_mode = IoMode::kDirect;
  } else if (io_mode == "buffered") {
    options.io_mode = IoMode::kBuffered;
  } else if (io_mode == "mmap") {
    options.io_mode = IoMode::kMapped;
  } else {
    throw py::value_error("io_mode must be 'direct', 'buffered' or 'mmap', got '" + io_mode + "'");
  }
  options.verify = verify;
  options.buffers_per_thread = buffers_per_thread;
  if (progress && progress->chunks() != plan.chunks.size())
    throw py::value_error("progress must count as many chunks as the plan has");
  options.progress = std::move(progress);

  std::optional<py::error_already_set> pending;
  auto interrupted = [&pending]() -> bool {
    py::gil_scoped_acquire gil;
    if (PyErr_CheckSignals() != 0) {
      pending.emplace();  // takes the raised exception (KeyboardInterrupt) from Python
      return true;
    }
    return false;
  };

  LoadStats stats;
  try {
    py::gil_scoped_release nogil;
    stats = run_load(plan, options, interrupted);
  } catch (const Error& e) {
    if (e.kind() == ErrorKind::kCancelled && pending) throw std::move(*pending);
    throw;
  }
  py::dict out;
  out["bytes_read"] = stats.bytes_read;
  out["chunks_direct"] = stats.chunks_direct;
  out["chunks_staged"] = stats.chunks_staged;
  out["chunks_verified"] = stats.chunks_verified;
  out["o_direct_used"] = stats.o_direct_used;
  out["direct_reads"] = stats.direct_reads;
  out["threads"] = stats.threads;
  out["seconds"] = stats.seconds;
  out["staging_alloc_s"] = stats.staging_alloc_seconds;
  return out;
}

using CopyTuple = std::tuple<uint64_t, int, uint64_t, uint64_t>;

py::dict run_copies_py(const std::vector<CopyTuple>& copies, const std::vector<DestTuple>& dests,
                       int num_threads, uint64_t piece_size, std::optional<py::function> cancelled) {
  std::vector<CopySpec> specs;
  specs.reserve(copies.size());
  for (const auto& [src, dest, dest_offset, length] : copies)
    specs.push_back(CopySpec{reinterpret_cast<const char*>(src), dest, dest_offset, length});
  std::vector<Destination> ds;
  for (const auto& [device, ptr, size] : dests)
    ds.push_back(Destination{make_device(device), reinterpret_cast<char*>(ptr), size});
  CopyStats stats;
  {
    py::gil_scoped_release nogil;
    std::function<bool()> check;
    if (cancelled) {
      check = [&cancelled]() -> bool {
        py::gil_scoped_acquire gil;
        try {
          return (*cancelled)().cast<bool>();
        } catch (py::error_already_set&) {
          return true;  // a broken hook stops the copy rather than letting it run on unchecked
        }
      };
    }
    stats = run_copies(specs, ds, num_threads, piece_size, check);
  }
  py::dict out;
  out["bytes"] = stats.bytes;
  out["pieces"] = stats.pieces;
  out["threads"] = stats.threads;
  out["seconds"] = stats.seconds;
  return out;
}

// The ordinal of a CUDA device string: "cuda" (0) or "cuda:N".
int cuda_ordinal(const std::string& spec) {
  if (spec == "cuda") return 0;
  if (spec.rfind("cuda:", 0) != 0 || spec.size() == 5 || spec.size() > 14 ||
      spec.find_first_not_of("0123456789", 5) != std::string::npos)
    throw Error(ErrorKind::kDevice, "invalid CUDA device '" + spec + "' (expected cuda:N)");
  return std::stoi(spec.substr(5));
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "sllm-store C++ core: checksums and the streaming loader";

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const Error& e) {
      py::object cls = py::module_::import("sllm_store.errors").attr(python_error_class(e.kind()));
      PyErr_SetString(cls.ptr(), e.what());
    }
  });

  m.def(
      "xxh3_64",
      [](const py::buffer& b) {
        py::buffer_info info = contiguous_bytes(b);
        size_t n = static_cast<size_t>(info.size * info.itemsize);
        py::gil_scoped_release nogil;
        return xxh3_64(info.ptr, n);
      },
      py::arg("data"), "XXH3-64 (seed 0) of a C-contiguous buffer.");

  // One chunk on its way through a StagedCopier (StagedCopier.fill), owned by its Python handle:
  // leaving the `with` block (or collecting the handle) waits for its copies and frees its
  // staging blocks; a closed handle raises instead of touching a freed Fill.
  struct Fill {
    std::unique_ptr<StagedCopier::Fill> fill;
    Fill(std::unique_ptr<StagedCopier::Fill> f) : fill(std::move(f)) {}
    Fill(Fill&&) = default;
    ~Fill() {  // collected without __exit__: wait for the copies without holding the GIL
      if (fill && PyGILState_Check()) {
        py::gil_scoped_release nogil;
        fill.reset();
      }
    }
    StagedCopier::Fill& get() {
      if (!fill) throw Error(ErrorKind::kFormat, "the fill is closed");
      return *fill;
    }
  };
  py::class_<Fill>(m, "StagedFill",
                   "One chunk on its way through a StagedCopier, its bytes given in order "
                   "(StagedCopier.fill). A context manager: leaving it waits for the copies and frees "
                   "the staging blocks, finished or not.")
      .def("__enter__", [](py::object self) { return self; })
      .def("__exit__", [](Fill& f, const py::args&) {
        py::gil_scoped_release nogil;
        f.fill.reset();
      })
      .def(
          "add",
          [](Fill& f, const py::buffer& data) {
            StagedCopier::Fill& fill = f.get();
            py::buffer_info info = contiguous_bytes(data);
            py::gil_scoped_release nogil;
            fill.add(static_cast<const char*>(info.ptr), static_cast<size_t>(info.size * info.itemsize));
          },
          py::arg("data"), "The chunk's next bytes.")
      .def(
          "finish",
          [](Fill& f) {
            StagedCopier::Fill& fill = f.get();
            py::gil_scoped_release nogil;
            return fill.finish();
          },
          "Wait for the copies; return the chunk's XXH3-64. Raises if bytes are missing.")
      .def_property_readonly("added", [](Fill& f) { return f.get().added(); }, "Bytes given so far.");

  py::class_<StagedCopier>(m, "StagedCopier",
                           "Copies chunks into destinations (device, address, size); for GPUs through "
                           "`slots` reused page-locked staging blocks of `staging_size` bytes, "
                           "checksumming them in the same pass.")
      .def(py::init([](const std::vector<DestTuple>& dests, uint64_t staging_size, int slots, int readers,
                       uint64_t reader_size) {
             std::map<std::string, std::shared_ptr<Device>> devices;  // one per spec
             std::vector<Destination> ds;
             for (const auto& [spec, ptr, size] : dests) {
               auto& dev = devices[spec];
               if (!dev) dev = make_device(spec);
               ds.push_back(Destination{dev, reinterpret_cast<char*>(ptr), size});
             }
             return std::make_unique<StagedCopier>(std::move(ds), static_cast<size_t>(staging_size), slots,
                                                   readers, static_cast<size_t>(reader_size));
           }),
           py::arg("dests"), py::arg("staging_size"), py::arg("slots") = 8, py::arg("readers") = 0,
           py::arg("reader_size") = 0)
      .def(
          "copy",
          [](StagedCopier& c, const py::buffer& data, const std::vector<PieceTuple>& pieces) {
            py::buffer_info info = contiguous_bytes(data);
            std::vector<StagedCopier::Piece> ps = to_pieces(pieces);
            py::gil_scoped_release nogil;
            return c.copy(static_cast<const char*>(info.ptr), static_cast<size_t>(info.size * info.itemsize), ps);
          },
          py::arg("data"), py::arg("pieces"),
          "Copy pieces (chunk_offset, dest, dest_offset, length) of the chunk `data` into their "
          "destinations; returns the chunk's XXH3-64 when the copies are done.")
      .def(
          "fill",
          [](StagedCopier& c, uint64_t n, const std::vector<PieceTuple>& pieces) {
            return Fill{c.fill(static_cast<size_t>(n), to_pieces(pieces))};
          },
          py::arg("n"), py::arg("pieces"), py::keep_alive<0, 1>(),
          "Like copy() for a chunk of `n` bytes given piece by piece: `with copier.fill(n, pieces) "
          "as f: f.add(b) ...; digest = f.finish()`. Each staging block is copied on as soon as it "
          "is full.")
      .def(
          "read_back",
          [](StagedCopier& c, const std::vector<PieceTuple>& pieces, uint64_t n, const py::function& use) {
            std::vector<StagedCopier::Piece> ps = to_pieces(pieces);
            py::object result = py::none();
            py::gil_scoped_release nogil;
            c.read_back(ps, static_cast<size_t>(n), [&](const char* data, uint64_t digest) {
              py::gil_scoped_acquire gil;
              result = use(py::memoryview::from_memory(data, static_cast<py::ssize_t>(n)), digest);
            });
            return result;
          },
          py::arg("pieces"), py::arg("n"), py::arg("use"),
          "Copy pieces (chunk_offset, dest, dest_offset, length) of a chunk of `n` bytes back from "
          "their destinations into one of the copier's `readers` buffers (4 KiB-aligned; bytes "
          "no piece covers are zero) and return use(memoryview, xxh3_64). The memoryview is only "
          "valid during the call.")
      .def_property_readonly("to_device", &StagedCopier::to_device,
                             "Whether any destination is a device (not host memory).")
      .def_property_readonly("staged", &StagedCopier::staged,
                             "False once page-locked memory could not be had.")
      .def_property_readonly("pin_error", &StagedCopier::pin_error,
                             "Why page-locked memory could not be had ('' if it could).")
      .def_property_readonly("buffers", &StagedCopier::buffers, "Staging buffers made so far.")
      .def_property_readonly("alloc_seconds", &StagedCopier::alloc_seconds,
                             "Thread-seconds spent making staging buffers.")
      .def_property_readonly("wait_seconds", &StagedCopier::wait_seconds,
                             "Thread-seconds spent waiting for a free staging buffer.");

  py::class_<ChunkHasher>(m, "ChunkHasher",
                          "Checksums a byte stream per fixed-size chunk (XXH3-64).")
      .def(py::init<uint64_t>(), py::arg("chunk_size"))
      .def(
          "update",
          [](ChunkHasher& h, const py::buffer& b) {
            py::buffer_info info = contiguous_bytes(b);
            size_t n = static_cast<size_t>(info.size * info.itemsize);
            py::gil_scoped_release nogil;
            h.update(info.ptr, n);
          },
          py::arg("data"))
      .def("finish", &ChunkHasher::finish)
      .def_property_readonly("bytes_seen", &ChunkHasher::bytes_seen);

  py::class_<Progress, std::shared_ptr<Progress>>(
      m, "LoadProgress", "Which chunks of a running load have landed in their destinations.")
      .def(py::init<size_t>(), py::arg("chunks"))
      .def_property_readonly("chunks", &Progress::chunks)
      .def("mark", &Progress::mark, py::arg("chunk"), py::arg("nbytes"),
           "The chunk's bytes are in place (tiers that fill destinations themselves call this).")
      .def("close", &Progress::close, "The load ended: waiters stop waiting.")
      .def("cancel", &Progress::cancel, "Ask the load to stop.")
      .def_property_readonly("cancelled", &Progress::cancelled)
      .def_property_readonly("closed", &Progress::closed)
      .def_property_readonly("bytes", &Progress::bytes, "Bytes of the chunks marked so far.")
      .def_property_readonly("marked", &Progress::marked, "Chunks marked so far.")
      .def("all_marked", &Progress::all_marked, py::arg("chunks"))
      .def("wait", &Progress::wait, py::arg("chunks"), py::arg("timeout"), py::arg("queued") = false,
           py::call_guard<py::gil_scoped_release>(),
           "Block until the chunks are marked (`queued`: or their copies to a device queued), the "
           "progress is closed, or `timeout` seconds pass (negative: no limit); whether they all are.")
      .def("stream_wait", &Progress::stream_wait, py::arg("chunks"), py::arg("stream"), py::arg("device"),
           py::call_guard<py::gil_scoped_release>(),
           "Make `stream` (a CUDA stream handle of `device`, e.g. 'cuda:0') wait on the device for "
           "the chunks' copies there; returns at once. False, and nothing waits, unless every chunk "
           "is marked or queued.");

  m.def("run_load", &run_load_py, py::arg("files"), py::arg("chunks"), py::arg("segments"),
        py::arg("dests"), py::arg("num_threads"), py::arg("io_mode"), py::arg("verify"),
        py::arg("buffers_per_thread") = 2, py::arg("encodings") = std::vector<EncodingTuple>{},
        py::arg("progress") = std::shared_ptr<Progress>{},
        R"doc(Execute a load plan (see sllm_store/loader.py).

files: data file paths; chunks: (file, offset, length, checksum|None);
encodings: empty, or per chunk None (stored raw at its offset) or
(stored_offset, stored_length, codec, group) for compressed files;
segments: (chunk, chunk_offset, dest, dest_offset, length);
dests: (device, address, size); progress: a LoadProgress of as many chunks, marked as chunks
land (its cancel() stops the load). Returns statistics as a dict.)doc");


  m.def(
      "check_device", [](const std::string& spec) { make_device(spec); }, py::arg("device"),
      "Raise DeviceError unless this build can load into `device` (e.g. 'cpu').");

  m.def(
      "page_cache_fraction",
      [](const std::vector<std::string>& paths) {
        py::gil_scoped_release nogil;
        return page_cache_fraction(paths);
      },
      py::arg("paths"), "Fraction of the files' pages in the page cache (-1: unknown).");
  m.def(
      "preallocate",
      [](int fd, uint64_t size) {
        py::gil_scoped_release nogil;
        return preallocate(fd, size);
      },
      py::arg("fd"), py::arg("size"),
      "fallocate(fd, 0, 0, size): 0, or the errno (EOPNOTSUPP: the file system cannot).");
  m.def(
      "write_direct",
      [](int direct_fd, int fd, const py::buffer& data, uint64_t offset) {
        py::buffer_info info = contiguous_bytes(data);
        size_t n = static_cast<size_t>(info.size * info.itemsize);
        py::gil_scoped_release nogil;
        return write_direct(direct_fd, fd, info.ptr, n, offset);
      },
      py::arg("direct_fd"), py::arg("fd"), py::arg("data"), py::arg("offset"),
      "Write `data` at `offset` (a multiple of 4096) of a file: whole 4 KiB blocks with O_DIRECT "
      "through `direct_fd` (via an aligned buffer of this thread), the rest buffered through "
      "`fd`. Returns 0, or the errno (EINVAL: the file system refuses the direct write).");
  m.def("malloc_offset", &malloc_offset, py::arg("size"),
        "Where in its 4 KiB page this process's malloc starts a block of `size` bytes (the "
        "address modulo 4096 of one allocated and freed): where a GET body of that size from "
        "obstore will start.");
  m.def("set_cuda_library", &cuda::set_library, py::arg("path"),
        "The CUDA driver library to load on first use ('' for libcuda.so.1); True if it is the one used.");
  m.def("cuda_device_count", &cuda::device_count, "CUDA devices visible to the driver (0 if none).");
  m.def("cuda_unavailable_reason", &cuda::unavailable_reason,
        "Why the CUDA driver cannot be used ('' when it can).");

  m.def("run_copies", &run_copies_py, py::arg("copies"), py::arg("dests"), py::arg("num_threads"),
        py::arg("piece_size") = 64ull << 20, py::arg("cancelled") = py::none(),
        R"doc(Copy host memory into destinations on worker threads; blocks until done.

copies: (source address, dest, dest_offset, length); dests: (device, address, size).
cancelled: optional callable polled every 20 ms; when it returns True the copy stops after the
pieces in flight and raises SllmStoreError("copy cancelled").)doc");

  py::class_<PinnedArena>(m, "PinnedArena", "Host memory allocated once: page-locked when CUDA is usable.")
      .def(py::init([](size_t size, size_t segment_size, bool pin, int threads) {
             py::gil_scoped_release nogil;
             return std::make_unique<PinnedArena>(size, segment_size, pin, threads);
           }),
           py::arg("size"), py::arg("segment_size"), py::arg("pin") = true, py::arg("threads") = 8)
      .def_property_readonly("pinned", &PinnedArena::pinned)
      .def_property_readonly("size", &PinnedArena::size)
      .def_property_readonly("segment_size", &PinnedArena::segment_size)
      .def_property_readonly("segments",
                             [](const PinnedArena& a) {
                               std::vector<uint64_t> out;
                               for (size_t i = 0; i < a.num_segments(); ++i)
                                 out.push_back(reinterpret_cast<uint64_t>(a.segment(i)));
                               return out;
                             })
      .def("release", &PinnedArena::release, py::call_guard<py::gil_scoped_release>(), "Free the memory now.");

  m.def(
      "cuda_ipc_export",
      [](uint64_t ptr) {
        IpcExport e;
        {
          py::gil_scoped_release nogil;
          e = ipc_export(ptr);
        }
        return py::make_tuple(py::bytes(e.handle), e.offset, e.alloc_size, e.pci_bus_id);
      },
      py::arg("ptr"),
      "Export the GPU allocation holding `ptr`: (handle, offset, allocation size, PCI bus id).");

  py::class_<IpcMapping>(m, "CudaIpcMapping", "GPU memory of another process, open while this lives.")
      .def(py::init([](const std::string& pci_bus_id, const std::string& handle) {
             py::gil_scoped_release nogil;
             return std::make_unique<IpcMapping>(pci_bus_id, handle);
           }),
           py::arg("pci_bus_id"), py::arg("handle"))
      .def_property_readonly("base", &IpcMapping::base)
      .def_property_readonly("size", &IpcMapping::size, "bytes mapped from base")
      .def_property_readonly("ordinal", &IpcMapping::ordinal)
      .def("close", &IpcMapping::close, py::call_guard<py::gil_scoped_release>());

  m.def(
      "vmm_unsupported",
      [](const std::string& device) {
        int ordinal = cuda_ordinal(device);
        py::gil_scoped_release nogil;
        return vmm_unsupported(ordinal);
      },
      py::arg("device"),
      "Why `device` ('cuda:N') cannot allocate GPU memory shareable as a file descriptor ('' when it can).");

  py::class_<VmmAllocation>(m, "VmmAllocation",
                            "GPU memory of this process (CUDA virtual memory management), mapped read-write "
                            "at `address` and exportable to other processes as a file descriptor. A context "
                            "manager: leaving it closes the allocation.")
      .def(py::init([](const std::string& device, uint64_t size) {
             int ordinal = cuda_ordinal(device);
             py::gil_scoped_release nogil;
             return std::make_unique<VmmAllocation>(ordinal, size);
           }),
           py::arg("device"), py::arg("size"),
           "Allocate at least `size` bytes on `device` ('cuda:N'), rounded up to the allocation granularity.")
      .def_property_readonly("address", &VmmAllocation::address, "Device address (raises once closed).")
      .def_property_readonly("size", &VmmAllocation::size, "Bytes allocated (rounded up to the granularity).")
      .def_property_readonly("device", [](const VmmAllocation& a) { return "cuda:" + std::to_string(a.ordinal()); })
      .def_property_readonly("pci_bus_id", &VmmAllocation::pci_bus_id)
      .def("export_fd", &VmmAllocation::export_fd, py::call_guard<py::gil_scoped_release>(),
           "A new file descriptor for the memory (the caller closes it), for VmmMapping in another process.")
      .def("close", &VmmAllocation::close, py::call_guard<py::gil_scoped_release>(),
           "Unmap and release the memory (idempotent); other processes' mappings keep it alive.")
      .def("__enter__", [](py::object self) { return self; })
      .def("__exit__", [](VmmAllocation& a, const py::args&) {
        py::gil_scoped_release nogil;
        a.close();
      });

  py::class_<VmmMapping>(m, "VmmMapping",
                         "GPU memory of another process, imported from the file descriptor it exported "
                         "(VmmAllocation.export_fd) and mapped until closed. A context manager.")
      .def(py::init([](const std::string& pci_bus_id, int fd, uint64_t size, bool read_only) {
             py::gil_scoped_release nogil;
             return std::make_unique<VmmMapping>(pci_bus_id, fd, size, read_only);
           }),
           py::arg("pci_bus_id"), py::arg("fd"), py::arg("size"), py::arg("read_only") = true,
           "Map `size` bytes (the exporter's VmmAllocation.size) of the memory `fd` stands for; `fd` stays "
           "the caller's to close. `read_only` is False afterwards when the driver refused read-only access.")
      .def_property_readonly("address", &VmmMapping::address, "Device address (raises once closed).")
      .def_property_readonly("size", &VmmMapping::size)
      .def_property_readonly("read_only", &VmmMapping::read_only,
                             "Whether the device may only read the mapping.")
      .def_property_readonly("ordinal", &VmmMapping::ordinal, "The device, in this process's numbering.")
      .def("close", &VmmMapping::close, py::call_guard<py::gil_scoped_release>(), "Unmap (idempotent).")
      .def("__enter__", [](py::object self) { return self; })
      .def("__exit__", [](VmmMapping& v, const py::args&) {
        py::gil_scoped_release nogil;
        v.close();
      });

  m.def(
      "copy_device_to_device",
      [](const std::string& device, uint64_t dst, uint64_t src, uint64_t size) {
        int ordinal = cuda_ordinal(device);
        py::gil_scoped_release nogil;
        copy_device_to_device(ordinal, dst, src, size);
      },
      py::arg("device"), py::arg("dst"), py::arg("src"), py::arg("size"),
      "Copy `size` bytes of GPU memory on `device` from address `src` to `dst`; returns when done. The copy "
      "runs on a stream of its own, unordered with other streams: finish the work that writes `src` first "
      "(e.g. torch.cuda.synchronize()).");
  m.def(
      "cuda_memory_info",
      [](const std::string& device) {
        int ordinal = cuda_ordinal(device);
        py::gil_scoped_release nogil;
        return device_memory_info(ordinal);
      },
      py::arg("device"), "(free, total) bytes of `device`'s memory, as the CUDA driver counts them.");

  m.def(
      "group_bytes", [](const py::buffer& b, int group) { return regrouped(b, group, group_bytes); },
      py::arg("data"), py::arg("group"), "Byte grouping as the writer does it (docs/format.md).");
  m.def(
      "ungroup_bytes",
      [](const py::buffer& b, int group) {
        return regrouped(b, group, [](const char* s, char* d, size_t n, int g) { ungroup_bytes(s, d, n, g); });
      },
      py::arg("data"), py::arg("group"), "Inverse of group_bytes.");
  m.def(
      "decode_chunk",
      [](const py::buffer& b, int codec, size_t raw_len, int group, std::optional<py::buffer> out,
         bool checksum) -> py::object {
        py::buffer_info info = contiguous_bytes(b);
        size_t n = static_cast<size_t>(info.size * info.itemsize);
        py::object result;
        char* dst = nullptr;
        std::optional<py::buffer_info> held;  // keeps `out` exported (not resizable) until the end
        if (out) {
          held.emplace(contiguous_bytes(*out));
          if (held->readonly) throw py::value_error("out must be a writable buffer");
          if (static_cast<size_t>(held->size * held->itemsize) < raw_len)
            throw py::value_error("out holds " + std::to_string(held->size * held->itemsize) +
                                  " bytes, the chunk " + std::to_string(raw_len));
          dst = static_cast<char*>(held->ptr);
          result = py::none();
        } else {
          // A bytes object written in place before anyone else can see it: no second copy.
          if (raw_len > static_cast<size_t>(PY_SSIZE_T_MAX))
            throw py::value_error("raw_length " + std::to_string(raw_len) + " is too large");
          PyObject* bytes = PyBytes_FromStringAndSize(nullptr, static_cast<py::ssize_t>(raw_len));
          if (!bytes) {
            PyErr_Clear();
            throw Error(ErrorKind::kOutOfMemory, "cannot allocate " + std::to_string(raw_len) +
                                                     " bytes for a decoded chunk");
          }
          result = py::reinterpret_steal<py::object>(bytes);
          dst = PyBytes_AS_STRING(bytes);
        }
        uint64_t digest = 0;
        {
          py::gil_scoped_release nogil;
          // One decoder and scratch buffer per calling thread, reused across chunks.
          thread_local ChunkDecoder decoder;
          thread_local HostBuffer scratch;
          if (group > 1 && scratch.size() < raw_len) scratch = allocate_aligned_host(raw_len);
          std::optional<Xxh3> hash;
          if (checksum) hash.emplace();
          decoder.decode(static_cast<Codec>(codec), group, static_cast<const char*>(info.ptr), n, dst, raw_len,
                         static_cast<char*>(scratch.data()), "chunk", hash ? &*hash : nullptr);
          if (hash) digest = hash->digest();
        }
        if (checksum) return py::make_tuple(result, digest);
        return result;
      },
      py::arg("data"), py::arg("codec"), py::arg("raw_length"), py::arg("group") = 1, py::arg("out") = py::none(),
      py::arg("checksum") = false,
      "Decode one stored chunk (codec id as in the index's CODECS, then un-grouping) as the loader does: "
      "into `out` (a writable buffer of at least raw_length bytes; returns None) or a new bytes object. "
      "With checksum=True, returns (that, XXH3-64 of the decoded bytes), computed as they are written, "
      "and skips the zstd frame's own content checksum: the caller checks the chunk's checksum instead.");

}
