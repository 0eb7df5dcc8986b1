"""Zero the CUDA fatbin entries of an ELF shared library that a GPU will never load, so it compresses small.

This workplace sends at most 64 MiB to its GPU machine; onnxruntime-gpu's CUDA provider library is 284 MB
(cubins for sm_75, 80, 86, 89, 90 and 120). An H100/H200 (sm_90) loads only the sm_90 cubins, so the payload
of every other entry is overwritten with zeros -- headers, sizes and file layout unchanged -- and the file
then compresses to about 52 MB with xz. Fatbins that hold no entry for a kept arch are left whole.

    python scripts/device/prune_fatbin.py libonnxruntime_providers_cuda.so OUT.so --keep 90

Used for the H200 run in docs/benchmarks-gpu.md (onnxruntime-gpu 1.31.1); a normal GPU box installs the
wheel as it is and needs none of this.
"""

from __future__ import annotations

import argparse
import collections
import logging
import struct
import subprocess
import sys

log = logging.getLogger("prune_fatbin")
FATBIN_MAGIC = 0xBA55ED50
HEADER = struct.Struct("<IHHQ")  # magic, version, header size, size of the entries that follow
ENTRY = struct.Struct("<HHIQ")  # kind (1 PTX, 2 ELF), version, header size, padded payload size


def fatbin_section(path: str) -> tuple[int, int]:
    """File offset and size of the ``.nv_fatbin`` section (from ``readelf -S``)."""
    out = subprocess.run(["readelf", "-SW", path], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if ".nv_fatbin" in line:
            fields = line.split("]", 1)[1].split()
            return int(fields[3], 16), int(fields[4], 16)
    raise ValueError(f"{path} has no .nv_fatbin section")


def entries(buf: bytes, offset: int, size: int):
    """Yield (fatbin offset, [(kind, sm, entry offset, header size, padded size)]) for each fatbin."""
    pos, end = offset, offset + size
    while pos < end:
        magic, _, header_size, fat_size = HEADER.unpack_from(buf, pos)
        if magic != FATBIN_MAGIC:
            pos += 8  # alignment padding between fatbins
            continue
        epos, fat_end, items = pos + header_size, pos + header_size + fat_size, []
        while epos < fat_end:
            kind, _, entry_header, padded = ENTRY.unpack_from(buf, epos)
            if entry_header == 0:
                break
            sm = struct.unpack_from("<I", buf, epos + 28)[0]
            items.append((kind, sm, epos, entry_header, padded))
            epos += entry_header + padded
        yield pos, items
        pos = fat_end


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("library")
    parser.add_argument("output")
    parser.add_argument("--keep", default="90", help="comma-separated SM versions to keep (e.g. 90 or 80,90)")
    args = parser.parse_args(argv)
    keep = {int(x) for x in args.keep.split(",")}
    buf = bytearray(open(args.library, "rb").read())
    offset, size = fatbin_section(args.library)
    by_sm: collections.Counter = collections.Counter()
    whole = zeroed = 0
    for _, items in entries(buf, offset, size):
        for _, sm, _, _, padded in items:
            by_sm[sm] += padded
        if not any(sm in keep for _, sm, *_ in items):
            whole += 1
            continue
        for _, sm, epos, header, padded in items:
            if sm not in keep:
                buf[epos + header: epos + header + padded] = bytes(padded)
                zeroed += padded
    open(args.output, "wb").write(buf)
    log.info("payload MB by sm: %s", {sm: round(b / 1e6, 1) for sm, b in sorted(by_sm.items())})
    log.info("zeroed %.1f MB; %d fatbins without a kept sm left whole", zeroed / 1e6, whole)
    return 0


if __name__ == "__main__":
    sys.exit(main())
