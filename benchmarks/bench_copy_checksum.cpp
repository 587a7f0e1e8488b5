// The copy of GET bodies into page-locked staging blocks, fused with their XXH3 checksum
// (sllm::Xxh3::copy_update, csrc/format/checksum.cpp), against the alternatives, on N threads at
// once (as the remote load's copy threads run):
//
//   memcpy_then_hash  each 256 KiB memcpy'd into the block, then hashed there (the library's
//                     copy_update up to session 8)
//   copy_update       the library's: each 256 KiB of the source hashed, then copied with
//                     non-temporal stores
//   memcpy            a plain memcpy (no checksum), for scale
//
// Each thread copies 2 GiB: 16 MiB sources (fresh heap buffers, filled first, like GET bodies;
// only the copies are timed) into a ring of 8 reused 4 MiB blocks. GB/s: all threads' bytes over
// the slowest thread's copy time. Prints a table; --json PATH writes the results.
//
//   g++ -O2 -std=c++17 -pthread -Icsrc -Icsrc/third_party -o /tmp/bench_copy_checksum
//       benchmarks/bench_copy_checksum.cpp csrc/format/checksum.cpp csrc/format/xxh3_avx2.cpp
//   (one command)
//   /tmp/bench_copy_checksum 1,8,16 --json copy.json
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "format/checksum.h"

namespace {

constexpr size_t kPiece = 16u << 20, kBlock = 4u << 20, kRing = 8, kPerThread = size_t(2) << 30;
constexpr size_t kStep = 256u << 10;
const char* const kModes[] = {"memcpy_then_hash", "copy_update", "memcpy"};

struct Free {
  void operator()(char* p) const { std::free(p); }
};

// Seconds one thread spends copying kPerThread bytes in `mode`.
double copy_seconds(int mode) {
  std::unique_ptr<char, Free> ring(static_cast<char*>(std::aligned_alloc(4096, kBlock * kRing)));
  std::memset(ring.get(), 1, kBlock * kRing);
  double seconds = 0;
  size_t next = 0;
  uint64_t sink = 0;
  for (size_t done = 0; done < kPerThread; done += kPiece) {
    std::vector<char> src(kPiece);
    std::memset(src.data(), static_cast<int>(done >> 24), kPiece);
    const auto t0 = std::chrono::steady_clock::now();
    sllm::Xxh3 hash;
    for (size_t at = 0; at < kPiece; at += kBlock) {
      char* d = ring.get() + (next++ % kRing) * kBlock;
      const char* s = src.data() + at;
      if (mode == 0) {
        for (size_t q = 0; q < kBlock; q += kStep) {
          std::memcpy(d + q, s + q, kStep);
          hash.update(d + q, kStep);
        }
      } else if (mode == 1) {
        hash.copy_update(d, s, kBlock);
      } else {
        std::memcpy(d, s, kBlock);
      }
    }
    sink += hash.digest();
    seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  return seconds + static_cast<double>(sink & 1) * 1e-12;  // keeps the digests live
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<int> threads;
  const char* json = nullptr;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--json") == 0 && i + 1 < argc) {
      json = argv[++i];
    } else {
      for (char* p = argv[i]; *p;) {
        threads.push_back(static_cast<int>(std::strtol(p, &p, 10)));
        if (*p == ',') ++p;
      }
    }
  }
  if (threads.empty()) threads = {1, 8, 16};
  std::string out = "[";
  std::printf("%8s %18s %8s\n", "threads", "mode", "GB/s");
  for (int n : threads) {
    for (int mode = 0; mode < 3; ++mode) {
      double best = 0;
      for (int rep = 0; rep < 2; ++rep) {
        std::vector<double> secs(static_cast<size_t>(n));
        std::vector<std::thread> pool;
        for (int t = 0; t < n; ++t) pool.emplace_back([&secs, t, mode] { secs[t] = copy_seconds(mode); });
        for (auto& t : pool) t.join();
        best = std::max(best, n * static_cast<double>(kPerThread) / *std::max_element(secs.begin(), secs.end()) / 1e9);
      }
      std::printf("%8d %18s %8.2f\n", n, kModes[mode], best);
      out += std::string(out.size() > 1 ? "," : "") + "{\"threads\": " + std::to_string(n) + ", \"mode\": \"" +
             kModes[mode] + "\", \"gbps\": " + std::to_string(best) + "}";
    }
  }
  out += "]\n";
  if (json != nullptr) {
    FILE* f = std::fopen(json, "w");
    if (f == nullptr) return 1;
    std::fputs(out.c_str(), f);
    std::fclose(f);
  }
  return 0;
}
