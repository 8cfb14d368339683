// POSIX shared-memory segments shared by the ranks of one host.
//
// Lifetime: one rank creates the segment (O_EXCL, under a fresh random name), the others open it,
// and every rank unlinks the name as soon as all of them have mapped it; from then on the memory
// lives only as long as some rank still maps it, so even `kill -9` leaves nothing in /dev/shm.
// Names carry the creator's pid ("lepton-<pid>-<token>"), so a segment orphaned by a creator that
// died between creating and unlinking is removed by the next sweep (shm_sweep_orphans).
#pragma once
#include <cstddef>
#include <string>

namespace lp {

class ShmSegment {
 public:
  ShmSegment() = default;
  ShmSegment(const ShmSegment&) = delete;
  ShmSegment& operator=(const ShmSegment&) = delete;
  ShmSegment(ShmSegment&& o) noexcept { *this = std::move(o); }
  ShmSegment& operator=(ShmSegment&& o) noexcept;
  ~ShmSegment();

  // Creates a zero-filled segment of n_bytes and maps it (throws CommFault on failure).
  static ShmSegment create(const std::string& name, size_t n_bytes);
  // Opens and maps an existing segment, whatever its size; refuses (CommFault) one that another
  // user owns or that group or others may write.
  static ShmSegment open(const std::string& name);

  // Removes the name (idempotent; the mapping stays valid).
  void unlink();

  void* base() const { return base_; }
  size_t n_bytes() const { return n_bytes_; }
  const std::string& name() const { return name_; }

 private:
  std::string name_;
  void* base_ = nullptr;
  size_t n_bytes_ = 0;
  bool unlinked_ = false;
};

// Unlinks segments named "<prefix><pid>-..." whose creating pid no longer exists (orphans of a
// creator killed before it could unlink). Returns how many were removed.
int shm_sweep_orphans(const std::string& prefix);

}  // namespace lp
