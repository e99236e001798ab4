// tag_pause.h — tags, and pausing a tag's memory while its blocks keep their addresses.
//
// Every allocation carries the calling thread's current tag (Allocator::set_thread_tag), and
// segments never mix tags, so pause(tag) can unmap a tag's granules whole while its live
// blocks stay where they are, and resume(tag) maps them again at the same addresses,
// restoring the bytes from host copies when pause was asked to keep them (backup).
// DeviceAllocator::pause and resume live in tag_pause.cpp.
#pragma once

#include <cstddef>
#include <cstdint>
#include <unordered_map>
#include <vector>

namespace ekv {

using TagId = std::uint32_t;  // 0 = untagged; names in Allocator

struct Block;

// One tag on one device.
struct TagState {
  bool paused = false;
  std::unordered_map<Block*, std::vector<unsigned char>> backups;  // live block -> its bytes
  std::size_t backup_bytes = 0;
};

}  // namespace ekv
