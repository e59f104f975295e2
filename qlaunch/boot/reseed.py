"""A tiny static program that reseeds a restored guest's random number generator.

A guest restored from a warm image would otherwise repeat its randomness: writing to
/dev/urandom only mixes bytes into Linux's input pool, and 6.1's crng reseeds from that pool
only when its interval (tied to the guest's uptime, which a restore keeps) runs out. The
ioctls do it at once: RNDADDENTROPY (bytes from the host, credited) then RNDRESEEDCRNG.
busybox has no ioctl applet, and no compiler is needed for a dozen instructions: they are
written here per arch, into a minimal ELF with one loadable segment.

In the guest: `qlaunch-reseed <SEED >/dev/urandom` reads 32 bytes from stdin, issues both
ioctls on stdout, and exits 0, or with the errno of the call that failed.
"""

from __future__ import annotations

import struct

BASE = 0x400000  # above every arch's mmap_min_addr (32 KiB on arm)
SEED_BYTES = 32
RNDADDENTROPY = 0x40085203  # _IOW('R', 3, int[2]) where _IOC_WRITE is 1 (not mips, ppc)
RNDRESEEDCRNG = 0x5207  # _IO('R', 7)


def _x86_64(buf: int) -> bytes:
    def mov(op: int, imm: int) -> bytes:
        return bytes([op]) + struct.pack("<I", imm)

    eax, edi, esi, edx = 0xB8, 0xBF, 0xBE, 0xBA
    syscall = b"\x0f\x05"
    read = mov(eax, 0) + mov(edi, 0) + mov(esi, buf + 8) + mov(edx, SEED_BYTES) + syscall
    add = mov(eax, 16) + mov(edi, 1) + mov(esi, RNDADDENTROPY) + mov(edx, buf) + syscall
    reseed = mov(eax, 16) + mov(edi, 1) + mov(esi, RNDRESEEDCRNG) + mov(edx, 0) + syscall
    # test eax,eax; jnz over the reseed
    check = b"\x85\xc0\x75" + bytes([len(reseed)])
    # neg eax; mov edi,eax; exit(edi)
    leave = b"\xf7\xd8\x89\xc7" + mov(eax, 60) + syscall
    return read + add + check + reseed + leave


def _i386(buf: int) -> bytes:
    def mov(op: int, imm: int) -> bytes:
        return bytes([op]) + struct.pack("<I", imm)

    eax, ebx, ecx, edx = 0xB8, 0xBB, 0xB9, 0xBA
    int80 = b"\xcd\x80"
    read = mov(eax, 3) + mov(ebx, 0) + mov(ecx, buf + 8) + mov(edx, SEED_BYTES) + int80
    add = mov(eax, 54) + mov(ebx, 1) + mov(ecx, RNDADDENTROPY) + mov(edx, buf) + int80
    reseed = mov(eax, 54) + mov(ebx, 1) + mov(ecx, RNDRESEEDCRNG) + mov(edx, 0) + int80
    check = b"\x85\xc0\x75" + bytes([len(reseed)])
    # neg eax; mov ebx,eax; exit(ebx)
    leave = b"\xf7\xd8\x89\xc3" + mov(eax, 1) + int80
    return read + add + check + reseed + leave


def _aarch64(buf: int) -> bytes:
    def mov(rd: int, imm: int) -> list[int]:
        words = [0xD2800000 | ((imm & 0xFFFF) << 5) | rd]  # movz xd, #lo
        if imm >> 16:
            words.append(0xF2A00000 | ((imm >> 16) << 5) | rd)  # movk xd, #hi, lsl 16
        return words

    svc = [0xD4000001]
    read = mov(8, 63) + mov(0, 0) + mov(1, buf + 8) + mov(2, SEED_BYTES) + svc
    add = mov(8, 29) + mov(0, 1) + mov(1, RNDADDENTROPY) + mov(2, buf) + svc
    reseed = mov(8, 29) + mov(0, 1) + mov(1, RNDRESEEDCRNG) + mov(2, 0) + svc
    check = [0x35000000 | ((len(reseed) + 1) << 5)]  # cbnz w0, past the reseed
    leave = [0x4B0003E0] + mov(8, 93) + svc  # neg w0, w0; exit(w0)
    return struct.pack(
        f"<{len(read + add + check + reseed + leave)}I", *read, *add, *check, *reseed, *leave
    )


def _arm(buf: int) -> bytes:
    def mov(rd: int, imm: int) -> list[int]:
        def half(op: int, v: int) -> int:
            return op | ((v >> 12) << 16) | (rd << 12) | (v & 0xFFF)

        words = [half(0xE3000000, imm & 0xFFFF)]  # movw rd, #lo
        if imm >> 16:
            words.append(half(0xE3400000, imm >> 16))  # movt rd, #hi
        return words

    svc = [0xEF000000]
    read = mov(7, 3) + mov(0, 0) + mov(1, buf + 8) + mov(2, SEED_BYTES) + svc
    add = mov(7, 54) + mov(0, 1) + mov(1, RNDADDENTROPY) + mov(2, buf) + svc
    reseed = mov(7, 54) + mov(0, 1) + mov(1, RNDRESEEDCRNG) + mov(2, 0) + svc
    # cmp r0, #0; bne past the reseed (the branch offset counts from pc + 8, in words)
    check = [0xE3500000, 0x1A000000 | (len(reseed) - 1)]
    leave = [0xE2600000] + mov(7, 1) + svc  # rsb r0, r0, #0; exit(r0)
    words = read + add + check + reseed + leave
    return struct.pack(f"<{len(words)}I", *words)


# arch -> (ELF class 64?, e_machine, e_flags, code maker)
ARCHES = {
    "x86_64": (True, 62, 0, _x86_64),
    "i386": (False, 3, 0, _i386),
    "aarch64": (True, 183, 0, _aarch64),
    "arm": (False, 40, 0x05000000, _arm),  # EABI version 5: kernels without OABI need it
}


def supported(arch: str) -> bool:
    return arch in ARCHES


def program(arch: str) -> bytes:
    """The static ELF for arch (KeyError for an arch without one)."""
    is64, machine, flags, code_for = ARCHES[arch]
    ehsize, phsize = (64, 56) if is64 else (52, 32)
    # The code's length does not depend on the buffer's address (fixed-size moves), except
    # for movk/movt, which every address above 64 KiB needs: measure with a high address.
    code_len = len(code_for(BASE + 0x10000))
    start = BASE + ehsize + phsize
    buf = (start + code_len + 7) & ~7
    code = code_for(buf)
    assert len(code) == code_len
    pool = struct.pack("<ii", SEED_BYTES * 8, SEED_BYTES) + bytes(SEED_BYTES)
    body = code + bytes(buf - start - len(code)) + pool
    size = ehsize + phsize + len(body)
    ident = b"\x7fELF" + bytes([2 if is64 else 1, 1, 1, 0]) + bytes(8)
    if is64:
        eh = ident + struct.pack(
            "<HHIQQQIHHHHHH", 2, machine, 1, start, ehsize, 0, flags, ehsize, phsize, 1, 0, 0, 0
        )
        ph = struct.pack("<IIQQQQQQ", 1, 7, 0, BASE, BASE, size, size, 0x1000)
    else:
        eh = ident + struct.pack(
            "<HHIIIIIHHHHHH", 2, machine, 1, start, ehsize, 0, flags, ehsize, phsize, 1, 0, 0, 0
        )
        ph = struct.pack("<IIIIIIII", 1, 0, BASE, BASE, size, size, 7, 0x1000)
    return eh + ph + body
