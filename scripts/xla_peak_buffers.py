"""The buffers XLA holds at a compiled program's memory peak, grouped by the model line that made
them: `python scripts/xla_peak_buffers.py DUMP_DIR [--module jit_step] [--top 40]`.

DUMP_DIR is an XLA dump (XLA_FLAGS="--xla_dump_to=DUMP_DIR --xla_dump_hlo_module_re=..."); the
script reads the `*after_optimizations-live-range.txt` section "Live ranges at N (peak)" and
the optimised HLO's metadata (stack frames) to name each buffer by the innermost dig_jax line.
"""
from __future__ import annotations

import argparse
import collections
import glob
import re


def _frames(hlo_text):
  """stack frame id -> list of 'file:line (function)' from innermost to outermost."""
  sections = {}
  current = None
  for line in hlo_text.splitlines():
    if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      current = sections.setdefault(line, {})
      continue
    if current is None:
      continue
    m = re.match(r"(\d+) (.*)$", line)
    if not m:
      current = None
      continue
    current[int(m.group(1))] = m.group(2)
  files = {k: v.strip('"') for k, v in sections.get("FileNames", {}).items()}
  funcs = {k: v.strip('"') for k, v in sections.get("FunctionNames", {}).items()}
  locs = {}
  for k, v in sections.get("FileLocations", {}).items():
    d = dict(re.findall(r"(\w+)=(\d+)", v))
    locs[k] = (files.get(int(d["file_name_id"]), "?"), int(d["line"]),
               funcs.get(int(d["function_name_id"]), "?"))
  frames = {}
  for k, v in sections.get("StackFrames", {}).items():
    d = dict(re.findall(r"(\w+)=(\d+)", v))
    frames[k] = (int(d["file_location_id"]), int(d["parent_frame_id"]) - 1)
  out = {}
  for k in frames:
    chain, seen, j = [], set(), k
    while j in frames and j not in seen:
      seen.add(j)
      loc, parent = frames[j]
      f, line, fn = locs.get(loc, ("?", 0, "?"))
      chain.append((f, line, fn))
      j = parent
    out[k] = chain
  return out


def describe(chain):
  for f, line, fn in chain:
    if "/dig_jax/models/" in f or "/kernels_pallas/" in f:
      return f"{f.split('/')[-1]}:{line} {fn}"
  return " < ".join(f"{f.split('/')[-1]}:{line}" for f, line, _ in chain[:2]) or "-"


def instructions(hlo_text, frames):
  """instruction name -> (shape, op_name, where)."""
  out = {}
  roots, comp = {}, None  # fused computation -> its root's text (metadata for the fusion)
  for line in hlo_text.splitlines():
    c = re.match(r"%?([\w.\-]+) .*\{$", line)
    if c and not line.startswith(" "):
      comp = c.group(1)
    elif line.lstrip().startswith("ROOT ") and comp:
      roots[comp] = line
  for line in hlo_text.splitlines():
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (.*)$", line)
    if not m:
      continue
    name, rest = m.groups()
    if rest.startswith("("):  # tuple shape: up to the matching parenthesis
      depth = 0
      for i, ch in enumerate(rest):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
          break
      shape = rest[:i + 1]
    else:
      shape = rest.split(" ")[0]
    called = re.search(r"calls=%?([\w.\-]+)", rest)
    if "metadata=" not in rest and called and called.group(1) in roots:
      rest = rest + " " + roots[called.group(1)]
    op = re.search(r'op_name="([^"]*)"', rest)
    sf = re.search(r"stack_frame_id=(\d+)", rest)
    where = describe(frames.get(int(sf.group(1)), [])) if sf else "-"
    out[name] = (shape, op.group(1) if op else rest.split(" ")[1].split("(")[0], where)
  return out


def _tuple_elements(shape):
  """'(a, (b, c), d)' -> ['a', '(b, c)', 'd']."""
  if not shape.startswith("("):
    return [shape]
  out, depth, start = [], 0, 1
  for i, ch in enumerate(shape):
    depth += ch in "({["
    depth -= ch in ")}]"
    if (ch == "," and depth == 1) or (ch == ")" and depth == 0):
      out.append(shape[start:i].strip())
      start = i + 1
  return out


def peak_buffers(dump_dir, module="jit_step"):
  live = glob.glob(f"{dump_dir}/*{module}*after_optimizations-live-range.txt")
  hlo = [p for p in glob.glob(f"{dump_dir}/*{module}*after_optimizations.txt")]
  if not live or not hlo:
    raise SystemExit(f"no live-range / optimised HLO dump for {module} in {dump_dir}")
  text = open(hlo[0]).read()
  insts = instructions(text, _frames(text))
  lines = open(live[0]).read().splitlines()
  start = next(i for i, l in enumerate(lines) if "(peak):" in l)
  rows = []
  for l in lines[start + 1:]:
    m = re.match(r"\s+([\w.\-]+)\{([\d,]*)\}: (\d+) bytes", l)
    if not m:
      break
    name, index, size = m.group(1), m.group(2), int(m.group(3))
    shape, op, where = insts.get(name, ("?", "", "-"))
    for i in (int(j) for j in index.split(",") if j):
      shape = _tuple_elements(shape)[i]
    shape = re.sub(r"/\*.*?\*/", "", shape)
    rows.append((size, name, re.sub(r"\{[^}]*\}", "", shape), op, where))
  return lines[start].strip(), rows


def print_groups(head, rows, top=60, tokens=0):
  total = sum(r[0] for r in rows)
  print(f"{head} {len(rows)} buffers, {total / 2**20:.1f} MiB")
  groups = collections.defaultdict(lambda: [0, 0])
  for size, name, shape, op, where in rows:
    if op.startswith(("state[", "params[", "batch[")) or name.startswith(("state__", "params__")):
      key = ("", "entry arguments (parameters, optimizer state, batch)", "")
    else:
      key = (shape, where if where != "-" else re.sub(r"[.\d]+$", "", name), op.split("/")[-1][:40])
    groups[key][0] += size
    groups[key][1] += 1
  for (shape, where, op), (size, count) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]:
    per_tok = f" {size / tokens:8.0f} B/tok" if tokens else ""
    print(f"  {size / 2**20:8.2f} MiB{per_tok} x{count:<3d} {shape:28s} {where:45s} {op}")


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("dump_dir")
  parser.add_argument("--module", default="jit_step")
  parser.add_argument("--top", type=int, default=60)
  parser.add_argument("--tokens", type=int, default=0, help="print bytes per token too")
  args = parser.parse_args()
  print_groups(*peak_buffers(args.dump_dir, args.module), args.top, args.tokens)


if __name__ == "__main__":
  main()
