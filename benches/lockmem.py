#!/usr/bin/env python3
"""Keeps a file resident in the page cache for a benchmark's duration.

    python3 benches/lockmem.py FILE     # prints "locked N bytes" once resident; runs until killed

Some machines evict file pages in the background (e.g. a DAMON pageout scheme): a "warm"
4 KiB read then goes to the disk, and queue-depth-1 numbers measure eviction instead of the
server. This maps FILE shared and read-only with MAP_POPULATE and mlock()s it. If mlock is not
allowed (RLIMIT_MEMLOCK), it says so and re-reads the file every 2 s instead.
"""
import ctypes, ctypes.util, mmap, os, sys, time

libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
MAP_POPULATE = 0x8000


def main():
    path = sys.argv[1]
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED | MAP_POPULATE, fd, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        sys.exit(f"lockmem: mmap {path}: {os.strerror(ctypes.get_errno())}")
    if libc.mlock(addr, size) == 0:
        print(f"locked {size} bytes", flush=True)
        while True:
            time.sleep(3600)
    print(f"lockmem: mlock {path}: {os.strerror(ctypes.get_errno())}; re-reading every 2 s instead",
          flush=True)
    while True:
        with open(path, "rb") as f:
            while f.read(1 << 20):
                pass
        time.sleep(2)


if __name__ == "__main__":
    main()
