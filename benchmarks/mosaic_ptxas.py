"""ptxas's report on the Mosaic GPU prefill kernel: registers, spills, and wgmma serialization.

    python3 benchmarks/mosaic_ptxas.py                     # prefill 4 x 4096, 16 / 8 heads, D 128
    python3 benchmarks/mosaic_ptxas.py --seqlen 1024 --batch 8 --head-dim 64
    python3 benchmarks/mosaic_ptxas.py --kernel ab/mosaic_variant.py   # a copy of mosaic.py instead

Runs one causal prefill call through the Mosaic kernel (`mosaic.attention`) on the GPU, in a child
process with MOSAIC_GPU_DUMP_PTXAS=1 (Mosaic then prints ptxas's verbose report while it compiles),
and prints the report's lines that matter. Exit status 3 when ptxas says it serialized wgmmas
(C7513: a non-wgmma instruction wrote a wgmma's input registers inside its pipeline stage; the
tensor cores then wait on every wgmma, benchmarks/NOTES.md session 15 item 1), 4 when it spilled
registers (the kernel on main does, a few bytes: session 29 item 4), 0 otherwise.
Needs a Hopper GPU and JAX's CUDA plugin.

    python3 benchmarks/mosaic_ptxas.py --sass              # the SASS's loops, instruction classes
    python3 benchmarks/mosaic_ptxas.py --sass --save k.sass  # ... and the whole listing kept

--sass instead dumps the kernel's SASS (MOSAIC_GPU_DUMP_SASS=1) and prints each loop (a backward
branch and the instructions from its target to it) with its instructions by class: the compute
warpgroups' key-tile loops are the largest, and their non-HGMMA instructions are the per-tile work
that, under the power cap, sets the kernel's speed (benchmarks/NOTES.md, session 26 item 4).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

_KEEP = re.compile(r"C75\d\d|spill|Used \d+ registers|error", re.IGNORECASE)
# An instruction line of nvdisasm's listing: /*0a90*/ [@P0 | @!UP1] OPCODE.MODIFIERS operands ;
_SASS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_]+)*)([^;]*);")
# Instruction classes, by opcode (first match wins; the rest is "other").
_CLASSES = (
    ("tensor", ("HGMMA", "WARPGROUP")),
    ("fp32", ("FFMA", "FMUL", "FADD", "FMNMX", "FSEL", "FSETP", "FCHK")),
    ("mufu", ("MUFU",)),
    ("convert", ("F2FP", "F2F", "F2I", "I2F")),
    ("shuffle", ("SHFL",)),
    ("move", ("MOV", "UMOV", "R2UR", "S2R", "S2UR", "CS2R", "PRMT")),
    ("shared/global", ("LDS", "STS", "LDSM", "STSM", "LDG", "STG", "LD", "ST", "UTMA", "UBLKCP",
                       "LDGSTS", "UTMALDG", "UTMASTG")),
    ("sync", ("BAR", "SYNCS", "MEMBAR", "FENCE", "WARPSYNC", "DEPBAR", "NANOSLEEP", "ERRBAR")),
    ("integer", ("IMAD", "IADD3", "LOP3", "ISETP", "SHF", "LEA", "SEL", "IABS", "UIADD3", "ULOP3",
                 "UISETP", "USHF", "ULEA", "UIMAD", "USEL", "VIADD", "IMNMX")),
    ("control", ("BRA", "BSSY", "BSYNC", "EXIT", "CALL", "RET", "YIELD", "NOP", "PLOP3", "VOTE",
                 "ELECT", "UPLOP3")),
)


_CLASS_OF = {op: name for name, ops in _CLASSES for op in ops}


def sass_classes(opcodes) -> dict:
  """Counts of instruction classes (`_CLASSES`, else "other") over a list of (opcode, modifiers)."""
  counts = dict.fromkeys([name for name, _ in _CLASSES] + ["other"], 0)
  for op, _ in opcodes:
    counts[_CLASS_OF.get(op, "other")] += 1
  return counts


def sass_loops(text: str) -> list:
  """The loops of a SASS listing: for each backward BRA, the instructions from its target up to it.

  Returns dicts (start, end: byte addresses; count; classes: `sass_classes`; ops: opcode counts),
  largest first.
  """
  insts = []  # (address, opcode, modifiers, operands)
  labels, pending = {}, []  # label -> the address of the instruction after it
  for line in text.splitlines():
    label = re.match(r"\s*(\.L\w+):", line)
    if label:
      pending.append(label.group(1))
    m = _SASS.search(line)
    if m:
      addr = int(m.group(1), 16)
      labels.update((name, addr) for name in pending)
      pending = []
      insts.append((addr, m.group(2), m.group(3), m.group(4)))
  loops = []
  for addr, op, _, operands in insts:
    if op != "BRA":
      continue
    hexa = re.search(r"0x([0-9a-f]+)\s*$", operands.strip())
    named = re.search(r"\((\.L\w+)\)", operands)
    start = int(hexa.group(1), 16) if hexa else labels.get(named.group(1)) if named else None
    if start is None or start > addr:
      continue
    body = [(o, mods) for a, o, mods, _ in insts if start <= a <= addr]
    ops = {}
    for o, mods in body:  # MUFU by its function (EX2, RCP, ...); the rest by opcode
      key = o + "." + mods.split(".")[1] if o == "MUFU" and mods else o
      ops[key] = ops.get(key, 0) + 1
    loops.append(dict(start=start, end=addr, count=len(body), classes=sass_classes(body), ops=ops))
  return sorted(loops, key=lambda l: -l["count"])


def _print_loops(text: str, top: int = 6) -> int:
  loops = sass_loops(text)
  if not loops:
    if "nvdisasm invocation failed" in text:
      print("(Mosaic GPU could not run nvdisasm, which it spawns to dump SASS: put a CUDA toolkit "
            "holding nvdisasm on PATH; the H200 machine of 2026-12-02 had none there)")
    else:
      print("(no SASS loops found: is this a GPU with JAX's CUDA plugin, and MOSAIC_GPU_DUMP_SASS "
            "honoured by this jaxlib?)")
    return 1
  names = [name for name, _ in _CLASSES] + ["other"]
  print(f"{'loop (bytes)':<16} {'insts':>5} " + " ".join(f"{n[:8]:>8}" for n in names))
  for l in loops[:top]:
    print(f"{l['start']:#06x}-{l['end']:#06x} {l['count']:>5} " +
          " ".join(f"{l['classes'][n]:>8}" for n in names))
    print("   " + ", ".join(f"{k} {v}" for k, v in sorted(l["ops"].items(), key=lambda kv: -kv[1])[:14]))
  return 0


def _call(batch: int, seqlen: int, heads: int, kv_heads: int, head_dim: int, page: int,
          kernel=None) -> None:
  """One prefill call (uniform lengths, distinct pages) with the Mosaic kernel's `attention`: the
  package's, or (kernel: a path) that copy of `mosaic.py` (`mosaic_ab.load_kernel`)."""
  import jax
  import jax.numpy as jnp

  from jax_varlen_attn.validation import AttentionArgs, validate
  from mosaic_ab import load_kernel

  total = batch * seqlen
  pages = total // page
  cache = jnp.full((pages, page, kv_heads, head_dim), 0.01, jnp.float16)
  spec, arrays = validate(AttentionArgs(
      q=jnp.full((total, heads, head_dim), 0.01, jnp.float16), k=cache, v=cache,
      cu_seqlens_q=jnp.arange(batch + 1, dtype=jnp.int32) * seqlen, max_seqlen_q=seqlen,
      seqused_k=jnp.full((batch,), seqlen, jnp.int32), max_seqlen_k=seqlen,
      block_table=jnp.arange(pages, dtype=jnp.int32).reshape(batch, seqlen // page), causal=True))
  mod = load_kernel("variant", kernel)
  jax.jit(lambda a: mod.attention(spec, a)[0])(arrays).block_until_ready()


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seqlen", type=int, default=4096)
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--kv-heads", type=int, default=8)
  p.add_argument("--head-dim", type=int, default=128)
  p.add_argument("--page", type=int, default=16)
  p.add_argument("--kernel", help="a copy of backends/pallas/mosaic.py to compile instead")
  p.add_argument("--sass", action="store_true",
                 help="print the SASS's loops by instruction class instead of ptxas's report")
  p.add_argument("--save", help="with --sass: also write the whole listing to this file")
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.seqlen % args.page:
    p.error(f"--seqlen {args.seqlen} must be a multiple of --page {args.page}")
  import jax
  if jax.default_backend() != "gpu":
    p.error(f"needs a CUDA GPU (JAX's backend here: {jax.default_backend()}); off the GPU the "
            "pallas backend interprets its Triton-lowered kernel, and ptxas never runs")
  if args.child:
    _call(args.batch, args.seqlen, args.heads, args.kv_heads, args.head_dim, args.page,
          args.kernel)
    return 0
  env = dict(os.environ, **({"MOSAIC_GPU_DUMP_SASS": "1"} if args.sass
                             else {"MOSAIC_GPU_DUMP_PTXAS": "1"}))
  cmd = [sys.executable, os.path.abspath(__file__), "--child"] + [
      a for a in (argv if argv is not None else sys.argv[1:]) if a != "--sass"]
  if args.save:  # the child takes no --save
    i = cmd.index("--save")
    del cmd[i:i + 2]
  run = subprocess.run(cmd, env=env, capture_output=True, text=True, errors="replace")
  if args.sass:
    if run.returncode:
      print(f"the call failed (exit {run.returncode}):\n{run.stderr[-2000:]}")
      return run.returncode
    if args.save:
      with open(args.save, "w") as f:
        f.write(run.stdout + run.stderr)
    return _print_loops(run.stdout + run.stderr)
  report = sorted({line.strip()[:200] for line in (run.stdout + run.stderr).splitlines()
                   if _KEEP.search(line)})
  print("\n".join(report) or "(no ptxas report: is this a GPU with JAX's CUDA plugin?)")
  if run.returncode:
    print(f"the call failed (exit {run.returncode}):\n{run.stderr[-2000:]}")
    return run.returncode
  if any("C7513" in line for line in report):
    print("ptxas serialized the kernel's wgmmas (C7513)")
    return 3
  if spilled(report):
    print("ptxas spilled registers (spill traffic costs local-memory reads in the key loop; the "
          "persistent kernel spills 28 / 72 B and runs: benchmarks/NOTES.md, session 29 item 1)")
    return 4
  return 0


def spilled(report_lines) -> bool:
  """Whether ptxas's report says any function spilled (non-zero spill stores or loads)."""
  return any(int(n) > 0 for line in report_lines
             for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", line))


if __name__ == "__main__":
  sys.exit(main())
