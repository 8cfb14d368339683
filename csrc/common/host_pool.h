// A small cache of large host buffers for op outputs.
//
// A fresh multi-MiB output from the allocator is fresh pages: the OS faults in and zeroes every page
// on first touch, which for a memory-bound kernel (dequantize writes 4 bytes per byte read) costs as
// much as the kernel itself. Outputs of at least kHostPoolMinBytes are therefore served from here:
// a released block is kept (pages resident) and handed to the next request of the same rounded
// size, the way a caching GPU allocator works. At most host_pool_limit_bytes() are kept; beyond
// that the oldest cached blocks are unmapped. Thread-safe.
#pragma once
#include <cstddef>
#include <cstdint>

namespace lp {

constexpr size_t kHostPoolMinBytes = size_t(8) << 20;  // smaller outputs: the ordinary allocator

// A page-aligned block of at least n_bytes (rounded up to 2 MiB), with transparent huge pages
// requested. Throws std::bad_alloc when the OS refuses.
void* host_pool_acquire(size_t n_bytes, size_t* block_bytes);
// Returns a block from host_pool_acquire (block_bytes as it reported).
void host_pool_release(void* p, size_t block_bytes);

// Bytes kept for reuse at most (LEPTON_HOST_POOL_MB, default 512; 0 disables caching), and now.
size_t host_pool_limit_bytes();
size_t host_pool_cached_bytes();
// Frees every cached block (blocks in use are untouched); returns the bytes freed (lc.empty_cache).
size_t host_pool_trim();

}  // namespace lp
