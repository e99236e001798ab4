// stream_order.h — when the device is done with a freed block.
//
// A block freed on stream S may be reused at once by S (its work is ordered after the free),
// but by another stream, or unmapped, only once an event recorded on S after the free has
// completed. The free records nothing: the event is recorded when a block is first needed
// elsewhere (a malloc on another stream finds nothing, trim, a limit, OOM, pause), one for
// all the blocks freed on S by then. Blocks waiting on one sit on the pending list, oldest
// first, until a query or a wait finds it done. Events come from the device's backend
// (record_fence and friends in backend.h).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/status.h"

namespace ekv {

struct Block;

// A free-time event. A null fence stands for an event that could not be recorded: done only
// once the device is synchronized (wait_fence), reusable by its own stream meanwhile.
struct FenceRef {
  FenceRef(Backend* b, Fence f) : backend(b), fence(f) {}
  ~FenceRef() {
    if (fence != nullptr) backend->destroy_fence(fence);
  }
  FenceRef(const FenceRef&) = delete;
  FenceRef& operator=(const FenceRef&) = delete;
  Backend* backend;
  Fence fence;
  bool done = false;
  std::uint64_t asked = 0;  // the promotion pass that last queried it (one query per pass)
};

// Free blocks with a fence, oldest first; intrusive (Block::pprev, pnext, listed).
class PendingList {
 public:
  void push(Block* b);
  void unlink(Block* b);
  Block* head() const { return head_; }
  bool empty() const { return head_ == nullptr; }
  std::size_t bytes() const { return bytes_; }  // sizes of the listed blocks

 private:
  Block* head_ = nullptr;
  Block* tail_ = nullptr;
  std::size_t bytes_ = 0;
};

// Asks once, without waiting, whether f's event has completed; marks f done if so. A null
// fence is never found done this way.
bool poll_fence(Backend& events, FenceRef* f);
// Waits for f: its event, or for a null fence the whole device. Marks f done on success.
Status wait_fence(Backend& events, FenceRef* f);
// Waits for the work queued so far on each stream (an event recorded and waited on, not a
// device-wide synchronize).
Status wait_streams(Backend& events, const std::vector<void*>& streams);

// The free-time event of a block freed on `stream`, or what the free did instead.
struct FreeEvent {
  std::shared_ptr<FenceRef> fence;  // null: the device is done with the block already
  Status error;                     // why no event was recorded; ok when one was
  std::string how;                  // with an error: what the free did instead
};
FreeEvent record_free_event(Backend& events, void* stream);

}  // namespace ekv
