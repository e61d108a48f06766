"""Compiler resource report of the Triton kernels: registers, spills, shared memory per tiling.

No GPU needed: each candidate tiling is compiled ahead of time for ``sm_<arch>`` and the PTX is
assembled by the ``ptxas`` that Triton bundles (the one it uses itself) with ``-v``, which
prints registers per thread, spill stores/loads and the stack frame. The shared memory is
Triton's dynamic allocation (``metadata.shared``). Occupancy follows from these numbers:
an SM has 64 K registers, at most 2048 threads and 100-228 kB of shared memory, so a 1-warp
program with 64 registers allows 32 programs per SM, one with 200 registers on 4 warps only 2.

The GPU check prints :func:`resource_table` next to its timings, so a slow tiling can be told
apart from a spilling or low-occupancy one. From the command line::

    python -m maskattn_deploy.plugins.kernel_resources --arch 90
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SM_REGISTERS = 65536
SM_THREADS = 2048
# Shared memory per SM (bytes) by architecture (CUDA programming guide, compute capabilities).
SM_SHARED = {80: 164 * 1024, 86: 100 * 1024, 87: 164 * 1024, 89: 100 * 1024, 90: 228 * 1024}
# Head count used for HEADS = 0 ("all heads") candidates: SDXL's high stage.
ALL_HEADS_STANDIN = 10


@dataclass(frozen=True)
class Resources:
    """One compiled kernel's resource use on one architecture."""

    kernel: str
    tiling: str
    arch: int
    dtype: str
    num_warps: int
    registers: int
    spill_stores: int
    spill_loads: int
    stack_frame: int
    shared_mem: int

    @property
    def programs_per_sm(self) -> int:
        """Resident programs per SM allowed by registers, threads and shared memory."""
        threads = 32 * self.num_warps
        by_regs = SM_REGISTERS // max(1, self.registers * threads)
        by_smem = SM_SHARED.get(self.arch, 100 * 1024) // max(1, self.shared_mem)
        return max(0, min(by_regs, SM_THREADS // threads, by_smem))

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "programs_per_sm": self.programs_per_sm}


def ptxas_report(ptx: str, arch: int) -> dict[str, int]:
    """Registers, spills, stack frame of the (single) kernel in ``ptx`` from ``ptxas -v``."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    try:
        ptxas = get_ptxas(arch).path
    except TypeError:  # Triton 3.5: one ptxas for every architecture
        ptxas = get_ptxas().path
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        cmd = [ptxas, "-v", f"--gpu-name={sm_arch_from_capability(arch)}",
               str(src), "-o", str(Path(tmp) / "kernel.cubin")]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed for sm_{arch}: {log.strip()[-500:]}")
    return parse_ptxas_log(log)


def parse_ptxas_log(log: str) -> dict[str, int]:
    """Pick the numbers out of a ``ptxas -v`` log (one kernel)."""

    def number(pattern: str) -> int:
        match = re.search(pattern, log)
        return int(match.group(1)) if match else 0

    if not re.search(r"Used (\d+) registers", log):
        raise ValueError(f"no register count in the ptxas log: {log.strip()[-300:]}")
    return {
        "registers": number(r"Used (\d+) registers"),
        "spill_stores": number(r"(\d+) bytes spill stores"),
        "spill_loads": number(r"(\d+) bytes spill loads"),
        "stack_frame": number(r"(\d+) bytes stack frame"),
    }


def masked_softmax_resources(
    arch: int = 90, dtype: str = "fp16", block_t: int = 128, tilings: Any = None
) -> list[Resources]:
    """Each tiling (default: every candidate) of the masked-softmax kernel at ``block_t``
    (t = 77: 128)."""
    from maskattn_deploy.plugins import masked_softmax_triton as mst

    rows = []
    for tiling in mst.TUNING_CANDIDATES if tilings is None else tilings:
        r, warps, heads = tiling
        ptx, _, meta = mst.compile_ptx(dtype, arch, block_t, tiling=mst.Tiling(r, warps, heads))
        rows.append(_resources("masked_softmax", f"rows={r} warps={warps} heads={heads}",
                               arch, dtype, meta.num_warps, meta.shared_mem, ptx))  # fmt: skip
    return rows


def gated_attention_resources(
    arch: int = 90, dtype: str = "fp16", t: int = 77, head_dim: int = 64, tilings: Any = None
) -> list[Resources]:
    """Each tiling (default: every candidate) of the fused gated-attention kernel (HEADS 0
    compiled as 10)."""
    from maskattn_deploy.plugins import gated_attention_triton as gat

    rows = []
    for tiling in gat.TUNING_CANDIDATES if tilings is None else tilings:
        block_n, warps, heads = tiling
        request = gat.CompileRequest(
            dtype, arch, t=t, head_dim=head_dim,
            tiling=(block_n, warps, heads or ALL_HEADS_STANDIN),
        )  # fmt: skip
        ptx, _, meta = gat.compile_ptx(request)
        label = f"block_n={block_n} warps={warps} heads={heads or 'all'} d={head_dim}"
        rows.append(_resources("gated_attention", label, arch, dtype, meta.num_warps,
                               meta.shared_mem, ptx))  # fmt: skip
    return rows


def _resources(kernel, tiling, arch, dtype, num_warps, shared_mem, ptx) -> Resources:
    return Resources(kernel=kernel, tiling=tiling, arch=arch, dtype=dtype, num_warps=num_warps,
                     shared_mem=shared_mem, **ptxas_report(ptx, arch))  # fmt: skip


def resource_table(rows: list[Resources]) -> str:
    """The report as aligned text lines (one per tiling)."""
    header = (f"{'kernel':<16} {'tiling':<38} {'sm':>3} {'regs':>5} {'spill st/ld':>12} "
              f"{'smem':>7} {'prog/SM':>7}")  # fmt: skip
    lines = [header, "-" * len(header)]
    for r in rows:
        spills = f"{r.spill_stores}/{r.spill_loads}"
        lines.append(f"{r.kernel:<16} {r.tiling:<38} {r.arch:>3} {r.registers:>5} {spills:>12} "
                     f"{r.shared_mem:>7} {r.programs_per_sm:>7}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--dtype", default="fp16")
    parser.add_argument("--head-dims", default="64,80,128")
    args = parser.parse_args(argv)
    rows = masked_softmax_resources(args.arch, args.dtype)
    for d in (int(x) for x in args.head_dims.split(",")):
        rows += gated_attention_resources(args.arch, args.dtype, head_dim=d)
    print(resource_table(rows))


if __name__ == "__main__":
    main()
