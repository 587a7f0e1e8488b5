// The streaming loader: worker threads pull chunks, read them (into destination memory where it
// is host memory, else into pooled staging buffers), verify checksums on request, and hand the
// segments to the destination devices. The first error in any worker cancels the others and is
// rethrown to the caller; so is a caller-side interrupt (Ctrl-C).
#pragma once

#include <functional>

#include "pipeline/plan.h"

namespace sllm {

// Runs the plan to completion on the calling thread's behalf. `interrupted` is polled
// periodically from the calling thread; returning true cancels the load, joins the workers and
// throws Error(kCancelled). Every worker is joined before this returns or throws.
LoadStats run_load(const LoadPlan& plan, const LoadOptions& options,
                   const std::function<bool()>& interrupted);

}  // namespace sllm
