"""What a test needs to know of a shared library, read from its ELF file in pure Python (no readelf, no nm).

Little-endian ELF64 only (x86-64 and aarch64 Linux), through the section
headers, which every linker-made library has.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import NamedTuple

SHT_SYMTAB, SHT_DYNAMIC, SHT_DYNSYM = 2, 6, 11
DT_NULL, DT_NEEDED = 0, 1
SHN_UNDEF = 0


class Section(NamedTuple):
    type: int
    offset: int
    size: int
    link: int  # for these sections: the index of their string table
    entsize: int


def sections(data: bytes) -> list[Section]:
    if data[:4] != b"\x7fELF":
        raise ValueError("not an ELF file")
    if data[4] != 2 or data[5] != 1:
        raise ValueError("only little-endian ELF64 is read")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    out = []
    for i in range(shnum):
        header = struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)
        _, sh_type, _, _, offset, size, link, _, _, entsize = header
        out.append(Section(sh_type, offset, size, link, entsize))
    return out


def string_at(data: bytes, table: Section, offset: int) -> str:
    start = table.offset + offset
    return data[start:data.index(b"\0", start)].decode()


def needed_libraries(path: str | Path) -> list[str]:
    """The DT_NEEDED entries of the dynamic section: the shared libraries the loader maps with this one."""
    data = Path(path).read_bytes()
    table = sections(data)
    needed = []
    for section in (s for s in table if s.type == SHT_DYNAMIC):
        for offset in range(section.offset, section.offset + section.size, 16):
            tag, value = struct.unpack_from("<qQ", data, offset)
            if tag == DT_NULL:
                break
            if tag == DT_NEEDED:
                needed.append(string_at(data, table[section.link], value))
    return needed


def defined_symbols(path: str | Path) -> set[str]:
    """Mangled names of the symbols defined here (.symtab where not stripped, and .dynsym)."""
    data = Path(path).read_bytes()
    table = sections(data)
    names = set()
    for section in (s for s in table if s.type in (SHT_SYMTAB, SHT_DYNSYM)):
        for offset in range(section.offset, section.offset + section.size, section.entsize or 24):
            name, _, _, shndx, _, _ = struct.unpack_from("<IBBHQQ", data, offset)
            if name and shndx != SHN_UNDEF:
                names.add(string_at(data, table[section.link], name))
    return names
