"""A small representative set of CUDA calls for compute-sanitizer (memcheck / racecheck /
initcheck).

Covers: decode with split-KV (merged by its tiles, and by the merge kernel, each also with
invalid metadata), a mixed batch with the mixed split launch, decode with many rows per KV
head (prefill tile shape), prefill with padding rows, q_len 0 requests and invalid
metadata, fp8 pages, HND and combined layouts, head_dims 64 / 128 / 256, page size 5
(division path), and append_kv.
Run it under the sanitizer with XLA_PYTHON_CLIENT_PREALLOCATE=false (scripts/gpu_check.sh
runs it with XLA's pooled allocator and again with XLA_PYTHON_CLIENT_ALLOCATOR=platform).
Prints one line per call, before each call a "sanitizer_cases: buffers" line with the device
address and size of every operand (after it one for the results), and "sanitizer_cases: done"
at the end. Big-offset paths (operands past 2^31 bytes) are left to tests/test_gpu_large.py:
multi-GB buffers under the sanitizer would take minutes.

    python scripts/sanitizer_cases.py --map LOG

reads a compute-sanitizer log of this script and attributes every reported address to the
operand buffer it falls in (or to none of them), per call and kernel (docs/sanitizers.md).
"""

from __future__ import annotations

import collections
import os
import re
import sys

import numpy as np

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[:0] = [_ROOT, os.path.join(_ROOT, "tests")]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import cases  # noqa: E402
import jax_paged_attn as jpa  # noqa: E402
from jax_paged_attn import launch_options  # noqa: E402

GPU = None  # set by main()


def put(x):
    return jax.device_put(x, GPU) if isinstance(x, np.ndarray) else x


def print_buffers(label, named):
    """One line: the device address range of each named array (for --map)."""
    parts = []
    for name, x in named:
        if x is None or not hasattr(x, "unsafe_buffer_pointer") or x.nbytes == 0:
            continue
        parts.append(f"{name}=0x{x.unsafe_buffer_pointer():x}+{x.nbytes}")
    print(f"sanitizer_cases: buffers [{label}] {' '.join(parts)}", flush=True)


_ATTN_NAMES = ["q", "k_pages", "v_pages", "block_tables", "seq_lens", "cu_seqlens_q"]


def run_attention(case, mutate=None, env=None):
    """One call of the case's op; `env`: launcher switches set while it is lowered (each
    call here has its own shapes, so its own executable)."""
    with launch_options.switched(env or {}):
        _run_attention(case, mutate)


def _run_attention(case, mutate):
    inp = cases.make_inputs(case)
    args = [put(a) for a in inp.args]
    if mutate is not None:
        bt, sl = np.array(inp.block_tables), np.array(inp.seq_lens)
        mutate(bt, sl)
        args[3], args[4] = put(bt), put(sl)
    kw = {k: put(v) for k, v in inp.kwargs.items()}
    label = (f"{case.kind} D={case.head_dim} ps={case.page_size} {case.kv_dtype} "
             f"{case.kv_layout}{' comb' if case.combined else ''}"
             f"{' invalid-metadata' if mutate is not None else ''}")
    print_buffers(label, list(zip(_ATTN_NAMES, args)) +
                  [(k, v) for k, v in kw.items() if hasattr(v, "nbytes")])
    fn = jpa.paged_decode if case.kind == "decode" else jpa.paged_prefill
    res = fn(*args, **kw)
    res = res if isinstance(res, tuple) else (res,)
    jax.block_until_ready(res)
    print_buffers(label, list(zip(["out", "lse"], res)))
    # Control for initcheck: an XLA kernel reads every byte of the same pages. If initcheck
    # took the pages' bytes for uninitialized, it flags this read too (the map tells the
    # kernels apart), which puts a report on our kernel down to the tool's view of the pool.
    pages = [x for x in args[1:3] if x is not None]
    jax.block_until_ready([jnp.sum(x.astype(jnp.float32)) for x in pages])
    out = np.asarray(res[0]).astype(np.float32)
    print(f"{case.kind:8s} D={case.head_dim:3d} ps={case.page_size:2d} {case.kv_dtype:4s} "
          f"{case.kv_layout}{' comb' if case.combined else ''}: out finite rows "
          f"{int(np.isfinite(out).reshape(out.shape[0], -1).all(1).sum())}/{out.shape[0]}",
          flush=True)


def main():
    A = cases.AttnCase
    # decode, long enough for several KV splits (merge kernel), GQA 4
    run_attention(A(kind="decode", batch=2, num_kv_heads=2, group=4, head_dim=128,
                    page_size=16, q_dtype="bf16", kv_dtype="bf16", max_kv_len=1500, seed=1))
    # split decode with an invalid request and sinks, merged by the tiles and by the merge
    # kernel (JPA_CUDA_FUSED_MERGE=0)
    def bad_split(bt, sl):
        sl[0] = bt.shape[1] * 16  # the table's capacity (>= 1800 keys): page 50 is needed
        bt[0, 50] = 10**6
    for fused, d in (("1", 64), ("0", 128)):
        run_attention(A(kind="decode", batch=3, num_kv_heads=2, group=4, head_dim=d,
                        page_size=16, q_dtype="bf16", kv_dtype="bf16", max_kv_len=1800,
                        sinks=True, seed=10 + d), mutate=bad_split,
                      env={"JPA_CUDA_FUSED_MERGE": fused})
    # decode with invalid metadata (page index out of range, seq_len past capacity)
    def bad_decode(bt, sl):
        bt[1, 0] = 10**6
        sl[2] = bt.shape[1] * 5 + 3
    run_attention(A(kind="decode", batch=4, num_kv_heads=2, group=2, head_dim=64,
                    page_size=5, q_dtype="f16", kv_dtype="f16", max_kv_len=300, seed=2),
                  mutate=bad_decode)
    # decode, 32 rows per KV head (prefill tile shape), fp8 HND combined, window + sinks
    run_attention(A(kind="decode", batch=3, num_kv_heads=1, group=8, head_dim=256,
                    page_size=16, q_dtype="bf16", kv_dtype="fp8", kv_layout="HND",
                    combined=True, k_scale=0.5, v_scale=1.5, q_len_per_req=4,
                    window_left=40, sinks=True, max_kv_len=400, seed=3))
    # prefill: padding, q_len 0 requests, softcap, non-causal, fp8; each with up to 280
    # packed rows per KV head (three row blocks of the sm90 kernel's 128: a pair and a single
    # one once a CTA takes row blocks in pairs, and requests shorter than the longest)
    run_attention(A(kind="prefill", batch=5, num_kv_heads=2, group=4, head_dim=128,
                    page_size=16, q_dtype="bf16", kv_dtype="bf16", max_q_len=70,
                    max_kv_len=200, zero_q_lens=True, pad_front=3, pad_back=5,
                    logits_soft_cap=10.0, seed=4))
    run_attention(A(kind="prefill", batch=3, num_kv_heads=2, group=2, head_dim=64,
                    page_size=5, q_dtype="f16", kv_dtype="fp8", k_scale=0.7, v_scale=0.9,
                    causal=False, window_left=9, max_q_len=140, max_kv_len=220, seed=5))
    # a mixed batch (q_len 1-3 at G 8: 8-24 packed rows) with the mixed split launch: the
    # 16-row launch's own splits (compact partials, merged by its tiles) beside the
    # prefill-shape launch
    run_attention(A(kind="prefill", batch=6, num_kv_heads=2, group=8, head_dim=128,
                    page_size=16, q_dtype="bf16", kv_dtype="bf16", max_q_len=3,
                    max_kv_len=1500, sinks=True, seed=12), env={"JPA_CUDA_MIXED": "1"})
    # prefill with invalid metadata and a long KV (splits in prefill; 280 packed rows)
    def bad_prefill(bt, sl):
        sl[0] = 0  # seq_len < q_len
    run_attention(A(kind="prefill", batch=2, num_kv_heads=2, group=4, head_dim=256,
                    page_size=16, q_dtype="bf16", kv_dtype="bf16", max_q_len=70,
                    max_kv_len=2000, seed=6), mutate=bad_prefill)
    # append (strided source, fp8 and bf16 pages)
    for ac in (cases.AppendCase(new_dtype="bf16", kv_dtype="bf16", head_dim=128,
                                skip_fraction=0.3, seed=7),
               cases.AppendCase(new_dtype="f32", kv_dtype="fp8", head_dim=64, combined=True,
                                kv_layout="HND", k_scale=0.4, v_scale=2.0, seed=8),
               cases.AppendCase(new_dtype="f32", kv_dtype="f16", head_dim=12, seed=9)):
        (kp, vp, k, v, slots), kw = cases.make_append_inputs(ac)
        ops = [put(kp), None if vp is None else put(vp), put(k), put(v), put(slots)]
        label = f"append D={ac.head_dim} {ac.kv_dtype}"
        print_buffers(label, list(zip(["k_pages", "v_pages", "k", "v", "slot_mapping"], ops)))
        out = jpa.append_kv(*ops, **kw)
        jax.block_until_ready(out)
        print_buffers(label, list(zip(["k_pages_out", "v_pages_out"], out)))
        print(f"append  D={ac.head_dim:3d} {ac.kv_dtype}: ok", flush=True)
    print("sanitizer_cases: done", flush=True)


# ----------------------------------------------------------------------------- --map LOG

_BUF_LINE = re.compile(r"sanitizer_cases: buffers \[(?P<label>[^\]]*)\] ?(?P<rest>.*)")
_BUF_ITEM = re.compile(r"(\w+)=0x([0-9a-f]+)\+(\d+)")
_ERR_HEAD = re.compile(r"=+ +(?P<what>(Invalid|Uninitialized) __\w+__ (memory )?(read|write)"
                       r".*?of size \d+ bytes)")
_AT = re.compile(r"=+ +at (?:0x[0-9a-f]+ in )?(?P<fn>.+)")
_FRAME = re.compile(r"Device Frame: *(?:0x[0-9a-f]+ in )?(?P<fn>.+)")
_ADDR = re.compile(r"=+ +Address (?P<a>0x[0-9a-f]+)")
_NEAR = 4096  # bytes: an address this close outside an operand is reported as such


def _short_name(frame):
    """A short function name (template arguments squeezed) from a sanitizer frame line."""
    frame = re.sub(r"^(void|[\w:]+\*?) (?=[\w:]+[<(])", "", frame.strip())
    m = re.match(r"([\w:]+)(<[^(]*>)?", frame)
    if not m:
        return frame[:60]
    return m.group(1).split("::")[-1] + re.sub(r"\s+", "", m.group(2) or "")[:80]


def _where(a, buffers):
    near = None
    for name, (start, size) in buffers.items():
        if a == start:  # where a zero-fill copy (no byte read) points
            return f"{name} at offset 0"
        if start <= a < start + size:
            return name
        if start + size <= a < start + size + _NEAR:
            near = f"within {_NEAR} bytes past the end of {name}"
        elif start - _NEAR <= a < start:
            near = f"within {_NEAR} bytes before {name}"
    return near or "outside every listed operand"


def map_log(path):
    """Attribute each address reported in a sanitizer log of this script to the operand it
    falls in (the operands of the call whose "buffers" lines precede the report)."""
    buffers, label = {}, "(before the first call)"
    counts = collections.Counter()
    err = None

    def finish():
        nonlocal err
        if err is not None and err.get("addr") is not None:
            kernel = err["frames"][-1] if err["frames"] else err["fn"]
            fn = kernel if kernel == err["fn"] else f"{kernel} > {err['fn']}"
            counts[(label, fn, err["what"], _where(err["addr"], buffers))] += 1
        err = None

    with open(path, errors="replace") as f:
        for line in f:
            m = _BUF_LINE.search(line)
            if m:
                finish()
                if m.group("label") != label:
                    label, buffers = m.group("label"), {}
                for name, a, n in _BUF_ITEM.findall(m.group("rest")):
                    buffers[name] = (int(a, 16), int(n))
                continue
            m = _ERR_HEAD.search(line)
            if m:
                finish()
                err = {"what": m.group("what"), "fn": "?", "frames": [], "addr": None}
                continue
            if err is None:
                continue
            if "Host Frame" in line or "Saved host backtrace" in line:
                finish()
                continue
            m = _FRAME.search(line)
            if m:
                err["frames"].append(_short_name(m.group("fn")))
                continue
            m = _AT.search(line)
            if m and err["fn"] == "?":
                err["fn"] = _short_name(m.group("fn"))
                continue
            m = _ADDR.search(line)
            if m and err["addr"] is None:
                err["addr"] = int(m.group("a"), 16)
        finish()
    for (lab, fn, what, where), n in sorted(counts.items(), key=lambda kv: -kv[1]):
        print(f"{n:6d}  [{lab}] {fn}: {what}: {where}")
    inside = sum(n for k, n in counts.items() if not k[3].startswith(("within", "outside")))
    near = sum(n for k, n in counts.items() if k[3].startswith("within"))
    total = sum(counts.values())
    print(f"map: {total} reported addresses: {inside} inside an operand, {near} within "
          f"{_NEAR} bytes outside one, {total - inside - near} elsewhere")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--map":
        map_log(sys.argv[2])
        sys.exit(0)
    GPU = jax.devices("cpu" if os.environ.get("JPA_SANITIZER_CASES_ON_CPU") == "1"
                      else "gpu")[0]
    main()
