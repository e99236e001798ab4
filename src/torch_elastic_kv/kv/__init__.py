"""KV layer: the page pool over arenas, how pages are placed in chunks, which pages each request
holds, and host swap space for preempted requests.
"""
