"""The instruction mix of the sm90 prefill kernels' MMA loop, read from their SASS: the offline
evidence a kernel change gets before a GPU measures it (docs/cuda_kernels.md).

For each kernel of a cubin (or of a `cuobjdump -sass` listing) whose name matches --kernel:
its instruction count, local-memory accesses (LDL / STL: spills), R2UR moves, and for its
MMA loop (the shortest backward branch whose body holds an HGMMA) the opcode counts
of the whole body and of its MMA issue (from the loop's head to the first BAR.ARV, the turn's
hand-over). --compare prints two listings' counts side by side.

    nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr \\
        -Iffi_src -cubin -o /tmp/d128.cubin ffi_src/cuda/sm90/prefill_d128.cu
    python3 scripts/sass_loop_mix.py /tmp/d128.cubin --kernel bfloat16Li3
    python3 scripts/sass_loop_mix.py /tmp/old.cubin --compare /tmp/new.cubin --kernel bfloat16Li3

cuobjdump comes from $CUOBJDUMP or PATH; the `triton` wheel carries one with the nvdisasm it
runs (triton/backends/nvidia/bin/: `pip download triton` and unzip both).
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys

_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
_BRANCH = re.compile(r"\bBRA\s+(?:U?!?P\w+,\s*)?(0x[0-9a-f]+)")
_FUNC = re.compile(r"Function : (\S+)")


def cuobjdump() -> str:
    for cand in (os.environ.get("CUOBJDUMP"), shutil.which("cuobjdump")):
        if cand and os.path.exists(cand):
            return cand
    sys.exit("no cuobjdump: set CUOBJDUMP (the triton wheel carries one)")


def listing(path: str) -> str:
    if path.endswith((".cubin", ".o", ".so")):
        tool = cuobjdump()
        # cuobjdump runs nvdisasm, which the triton wheel keeps beside it
        env = dict(os.environ, PATH=os.path.dirname(tool) + os.pathsep + os.environ.get("PATH", ""))
        return subprocess.run([tool, "-sass", path], check=True, capture_output=True, text=True,
                              env=env).stdout
    with open(path) as f:
        return f.read()


def kernels(text: str) -> dict[str, list[tuple[int, str]]]:
    """name -> [(address, instruction text)] per function of the listing."""
    out: dict[str, list[tuple[int, str]]] = {}
    cur = None
    for line in text.splitlines():
        m = _FUNC.search(line)
        if m:
            cur = out.setdefault(m.group(1), [])
            continue
        m = _INSN.search(line)
        if m and cur is not None:
            cur.append((int(m.group(1), 16), m.group(2).strip()))
    return out


def opcode(ins: str) -> str:
    words = ins.split()
    op = words[1] if words[0].startswith("@") and len(words) > 1 else words[0]
    return op.split(".")[0]


def mma_loop(body: list[tuple[int, str]]) -> tuple[int, int] | None:
    """(first, last address) of the shortest backward branch whose body holds an HGMMA: the
    tile loop (the mbarrier waits' retry branches, placed at the kernel's end, jump back
    across all of it, and the peeled first / last tiles are no loop)."""
    best = None
    for addr, ins in body:
        m = _BRANCH.search(ins)
        if not m or int(m.group(1), 16) >= addr:
            continue
        lo = int(m.group(1), 16)
        if any(lo <= a <= addr and opcode(i) == "HGMMA" for a, i in body):
            if best is None or addr - lo < best[1] - best[0]:
                best = (lo, addr)
    return best


def summary(body: list[tuple[int, str]]) -> dict[str, object]:
    ops = collections.Counter(opcode(i) for _, i in body)
    res: dict[str, object] = {"instructions": len(body), "LDL": ops["LDL"], "STL": ops["STL"],
                              "R2UR": ops["R2UR"]}
    loop = mma_loop(body)
    if loop:
        lo, hi = loop
        in_loop = [(a, i) for a, i in body if lo <= a <= hi]
        handover = next((a for a, i in in_loop if i.startswith("BAR.ARV")), hi)
        res["loop"] = collections.Counter(opcode(i) for _, i in in_loop)
        res["issue"] = collections.Counter(opcode(i) for a, i in in_loop if a <= handover)
    return res


def show(name: str, a: dict[str, object], b: dict[str, object] | None, top: int) -> None:
    print(name)
    for key in ("instructions", "LDL", "STL", "R2UR"):
        print(f"  {key:<12} {a[key]}" + (f" -> {b[key]}" if b else ""))
    for part in ("issue", "loop"):
        ca = a.get(part, collections.Counter())
        cb = b.get(part, collections.Counter()) if b else None
        total = f"{sum(ca.values())}" + (f" -> {sum(cb.values())}" if cb is not None else "")
        print(f"  {part} ({total} instructions)")
        names = [k for k, _ in (ca + (cb or collections.Counter())).most_common(top)]
        for k in names:
            print(f"    {k:<10} {ca[k]}" + (f" -> {cb[k]}" if cb is not None else ""))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sass", help="a cubin, or a cuobjdump -sass listing")
    p.add_argument("--compare", help="a second cubin or listing, printed beside the first")
    p.add_argument("--kernel", default="prefill_wgmma",
                   help="substring of the (mangled) kernel names to report")
    p.add_argument("--top", type=int, default=14, help="opcodes listed per part")
    args = p.parse_args(argv)
    first = kernels(listing(args.sass))
    second = kernels(listing(args.compare)) if args.compare else None
    names = [n for n in first if args.kernel in n]
    if not names:
        sys.exit(f"no kernel matching {args.kernel!r}")
    for name in names:
        b = summary(second[name]) if second and name in second else None
        show(name, summary(first[name]), b, args.top)


if __name__ == "__main__":
    main()
