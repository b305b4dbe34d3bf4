#!/usr/bin/env python3
# make-records.py FILE MIB: the demo appliance's data set, MIB MiB of 1 KiB records (an 8-byte
# random key, the CRC-32 of the rest of the record, 1012 random bytes), as va-app reads it.
import os, sys, zlib

path, mib = sys.argv[1], int(sys.argv[2])
with open(path, "wb") as f:
    for _ in range(mib):
        blob = bytearray(os.urandom(1 << 20))
        for o in range(0, 1 << 20, 1024):
            blob[o + 8:o + 12] = zlib.crc32(blob[o + 12:o + 1024]).to_bytes(4, "little")
        f.write(blob)
