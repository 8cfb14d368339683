#include "comm/shm_segment.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <string>
#include <utility>

#include "comm/comm_error.h"

namespace lp {

static std::string errno_text(const char* what, const std::string& name) {
  return std::string("ld.all_reduce: ") + what + " of shared-memory segment " + name + " failed: " +
         std::strerror(errno);
}

static std::string octal_mode(mode_t mode) {
  char buf[8];
  std::snprintf(buf, sizeof(buf), "0%03o", unsigned(mode & 0777));
  return buf;
}

ShmSegment& ShmSegment::operator=(ShmSegment&& o) noexcept {
  if (this != &o) {
    std::swap(name_, o.name_);
    std::swap(base_, o.base_);
    std::swap(n_bytes_, o.n_bytes_);
    std::swap(unlinked_, o.unlinked_);
  }
  return *this;
}

ShmSegment::~ShmSegment() {
  if (base_) munmap(base_, n_bytes_);
}

ShmSegment ShmSegment::create(const std::string& name, size_t n_bytes) {
  int fd = shm_open(name.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
  if (fd < 0) throw CommFault(errno_text("creation", name), true);
  if (ftruncate(fd, off_t(n_bytes)) != 0) {
    std::string msg = errno_text("sizing", name);
    close(fd);
    shm_unlink(name.c_str());
    throw CommFault(msg, true);
  }
  // Reserve the pages now: tmpfs files are sparse, and a store to a page that a full /dev/shm (64 MiB
  // by default in Docker) cannot back raises SIGBUS in the middle of a reduction. Here it is an
  // error the caller turns into the torch.distributed fallback.
  if (int rc = posix_fallocate(fd, 0, off_t(n_bytes)); rc != 0) {
    std::string msg = "ld.all_reduce: reserving " + std::to_string(n_bytes) + " bytes for shared-memory segment " +
                      name + " failed: " + std::strerror(rc) + " (is /dev/shm full or too small?)";
    close(fd);
    shm_unlink(name.c_str());
    throw CommFault(msg, true);
  }
  void* p = mmap(nullptr, n_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (p == MAP_FAILED) {
    std::string msg = errno_text("mapping", name);
    shm_unlink(name.c_str());
    throw CommFault(msg, true);
  }
  ShmSegment s;
  s.name_ = name;
  s.base_ = p;
  s.n_bytes_ = n_bytes;
  return s;
}

ShmSegment ShmSegment::open(const std::string& name) {
  int fd = shm_open(name.c_str(), O_RDWR, 0600);
  if (fd < 0) throw CommFault(errno_text("opening", name), true);
  struct stat st;
  if (fstat(fd, &st) != 0) {
    std::string msg = errno_text("stat", name);
    close(fd);
    throw CommFault(msg, true);
  }
  // Only a segment this user made, and that nobody else may write, is used: its contents steer
  // pointers and the ranks' agreement (the creator makes it 0600).
  std::string refuse;
  if (st.st_uid != geteuid())
    refuse = "is owned by uid " + std::to_string(st.st_uid) + ", not by this process's uid " +
             std::to_string(geteuid());
  else if (st.st_mode & (S_IWGRP | S_IWOTH))
    refuse = "is writable by group or others (mode " + octal_mode(st.st_mode) + ")";
  else if (st.st_size <= 0)
    refuse = "is empty";
  if (!refuse.empty()) {
    close(fd);
    throw CommFault("ld.all_reduce: shared-memory segment " + name + " " + refuse + ": not using it", true);
  }
  void* p = mmap(nullptr, size_t(st.st_size), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (p == MAP_FAILED) throw CommFault(errno_text("mapping", name), true);
  ShmSegment s;
  s.name_ = name;
  s.base_ = p;
  s.n_bytes_ = size_t(st.st_size);
  return s;
}

void ShmSegment::unlink() {
  if (!unlinked_ && !name_.empty()) {
    shm_unlink(name_.c_str());  // ENOENT (another rank was first) is fine
    unlinked_ = true;
  }
}

static constexpr long kOrphanMinAgeS = 60;

int shm_sweep_orphans(const std::string& prefix) {
  DIR* d = opendir("/dev/shm");
  if (!d) return 0;
  int removed = 0;
  while (dirent* e = readdir(d)) {
    const char* nm = e->d_name;
    if (std::strncmp(nm, prefix.c_str(), prefix.size()) != 0) continue;
    char* end = nullptr;
    long pid = std::strtol(nm + prefix.size(), &end, 10);
    if (pid <= 0 || end == nullptr || *end != '-') continue;
    if (kill(pid_t(pid), 0) == 0 || errno != ESRCH) continue;  // creator alive (or not ours to judge)
    // A creator in another pid namespace looks dead from here: leave young segments alone, a live
    // job unlinks its own within its setup timeout.
    struct stat st;
    std::string path = std::string("/dev/shm/") + nm;
    if (stat(path.c_str(), &st) != 0 || time(nullptr) - st.st_mtime < kOrphanMinAgeS) continue;
    if (shm_unlink((std::string("/") + nm).c_str()) == 0) ++removed;
  }
  closedir(d);
  return removed;
}

}  // namespace lp
