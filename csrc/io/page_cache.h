// How much of a set of files sits in the page cache (mmap + mincore), to pick the read mode:
// O_DIRECT for cold files (faster from disk), buffered for cached ones (a memory copy).
#pragma once

#include <string>
#include <vector>

namespace sllm {

// Fraction of the files' pages resident in the page cache, in [0, 1]; -1 if it cannot be told
// (a file cannot be opened or mapped). Empty files count for nothing.
double page_cache_fraction(const std::vector<std::string>& paths);

}  // namespace sllm
