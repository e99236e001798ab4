// stream_order.cpp — see stream_order.h.
#include "alloc/stream_order.h"

#include "alloc/segments.h"

namespace ekv {

void PendingList::push(Block* b) {
  b->pprev = tail_;
  b->pnext = nullptr;
  if (tail_ != nullptr)
    tail_->pnext = b;
  else
    head_ = b;
  tail_ = b;
  b->listed = true;
  bytes_ += b->size;
}

void PendingList::unlink(Block* b) {
  if (b->pprev != nullptr)
    b->pprev->pnext = b->pnext;
  else
    head_ = b->pnext;
  if (b->pnext != nullptr)
    b->pnext->pprev = b->pprev;
  else
    tail_ = b->pprev;
  b->pprev = b->pnext = nullptr;
  b->listed = false;
  bytes_ -= b->size;
}

bool poll_fence(Backend& events, FenceRef* f) {
  bool d = false;
  f->done = events.fence_done(f->fence, &d).ok() && d;
  return f->done;
}

Status wait_fence(Backend& events, FenceRef* f) {
  if (f->done) return Status::Ok();
  Status st = f->fence != nullptr ? events.fence_wait(f->fence) : events.synchronize();
  if (st.ok()) f->done = true;
  return st;
}

Status wait_streams(Backend& events, const std::vector<void*>& streams) {
  for (void* stream : streams) {
    Fence f = nullptr;
    EKV_RETURN_IF_ERROR(events.record_fence(stream, &f));
    Status st = events.fence_wait(f);
    events.destroy_fence(f);
    EKV_RETURN_IF_ERROR(st);
  }
  return Status::Ok();
}

FreeEvent record_free_event(Backend& events, void* stream) {
  FreeEvent out;
  Fence f = nullptr;
  out.error = events.record_fence(stream, &f);
  if (out.error.ok()) {
    out.fence = std::make_shared<FenceRef>(&events, f);
    return out;
  }
  // A handoff that fails would keep the blocks from every other stream for good. A wait now
  // tells what the event would have: the stream's work first (the blocks' last use is
  // there), the whole device if the stream cannot be waited on. Only when neither works
  // do the blocks wait, with a null fence, for trim()'s synchronize; their own stream may
  // reuse them meanwhile (stream order).
  Status ss = events.synchronize_stream(stream);
  Status cs = ss.ok() ? ss : events.synchronize();
  if (ss.ok()) {
    out.how = "synchronized the stream instead: the blocks are reusable by any stream";
  } else if (cs.ok()) {
    out.how = ss.message() + "; synchronized the device instead: the blocks are reusable by any stream";
  } else {
    out.how = ss.message() + "; " + cs.message() +
              "; the blocks stay reusable by their stream only until trim() synchronizes the device";
    out.fence = std::make_shared<FenceRef>(&events, nullptr);
  }
  return out;
}

}  // namespace ekv
