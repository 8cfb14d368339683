// Host buffer cache for large op outputs (see host_pool.h).
#include "common/host_pool.h"

#include <cstdlib>
#include <deque>
#include <mutex>
#include <new>
#include <utility>

#if defined(__unix__) || defined(__APPLE__)
#include <sys/mman.h>
#define LP_HAVE_MMAP 1
#endif

namespace lp {
namespace {

constexpr size_t kHuge = size_t(2) << 20;

struct Pool {
  std::mutex mu;
  std::deque<std::pair<void*, size_t>> cached;  // oldest first
  size_t cached_bytes = 0;
  size_t limit_bytes = 0;
  Pool() {
    const char* env = std::getenv("LEPTON_HOST_POOL_MB");
    long mb = env && *env ? std::strtol(env, nullptr, 10) : 512;
    limit_bytes = mb > 0 ? size_t(mb) << 20 : 0;
  }
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: blocks may be released during interpreter shutdown
  return *p;
}

void* map_block(size_t block_bytes) {
#ifdef LP_HAVE_MMAP
  void* p = mmap(nullptr, block_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
  madvise(p, block_bytes, MADV_HUGEPAGE);  // advice only; a refusal changes nothing
#endif
  return p;
#else
  void* p = std::aligned_alloc(kHuge, block_bytes);
  if (!p) throw std::bad_alloc();
  return p;
#endif
}

void unmap_block(void* p, size_t block_bytes) {
#ifdef LP_HAVE_MMAP
  munmap(p, block_bytes);
#else
  (void)block_bytes;
  std::free(p);
#endif
}

}  // namespace

void* host_pool_acquire(size_t n_bytes, size_t* block_bytes) {
  const size_t want = (n_bytes + kHuge - 1) / kHuge * kHuge;
  *block_bytes = want;
  Pool& p = pool();
  {
    std::lock_guard<std::mutex> lock(p.mu);
    for (auto it = p.cached.rbegin(); it != p.cached.rend(); ++it) {  // newest first: warmest pages
      if (it->second == want) {
        void* ptr = it->first;
        p.cached.erase(std::next(it).base());
        p.cached_bytes -= want;
        return ptr;
      }
    }
  }
  return map_block(want);
}

void host_pool_release(void* ptr, size_t block_bytes) {
  Pool& p = pool();
  std::deque<std::pair<void*, size_t>> evicted;
  {
    std::lock_guard<std::mutex> lock(p.mu);
    if (block_bytes <= p.limit_bytes) {
      p.cached.emplace_back(ptr, block_bytes);
      p.cached_bytes += block_bytes;
      ptr = nullptr;
    }
    while (p.cached_bytes > p.limit_bytes) {
      evicted.push_back(p.cached.front());
      p.cached_bytes -= p.cached.front().second;
      p.cached.pop_front();
    }
  }
  if (ptr) unmap_block(ptr, block_bytes);
  for (auto& b : evicted) unmap_block(b.first, b.second);
}

size_t host_pool_limit_bytes() { return pool().limit_bytes; }

size_t host_pool_cached_bytes() {
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mu);
  return p.cached_bytes;
}

size_t host_pool_trim() {
  Pool& p = pool();
  std::deque<std::pair<void*, size_t>> evicted;
  {
    std::lock_guard<std::mutex> lock(p.mu);
    evicted.swap(p.cached);
    p.cached_bytes = 0;
  }
  size_t freed = 0;
  for (auto& b : evicted) {
    unmap_block(b.first, b.second);
    freed += b.second;
  }
  return freed;
}

}  // namespace lp
