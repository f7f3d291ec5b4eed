"""The DiG/DiT benchmark's report: ratios between rows, the markdown table and the plot.

Rows are the dicts `dig_jax.bench` measures (one per model, attention, resolution, batch and
mode); nothing here touches a device.
"""
from __future__ import annotations

import collections

DIT_ATTENTION = ("cudnn", "xla")  # DiT's attention implementations DiG is compared with


def mode(row: dict) -> str:
  """"train" or "sample" (rows from before `--mode` existed are training rows)."""
  return row.get("mode", "train")


def add_ratios(rows: list[dict]):
  """On each DiG row: speed and peak-memory ratios against the DiT rows of the same size,
  resolution and batch (dig_speed_vs_dit_<impl> > 1 means DiG is faster; with `--interleave`
  also dig_speed_vs_dit_<impl>_interleaved, from the side-by-side step times)."""
  for r in rows:
    if r.get("family") != "DiG" or r.get("status") != "ok":
      continue
    for o in rows:
      if (o.get("family") == "DiT" and o.get("status") == "ok" and o["size"] == r["size"]
          and o["px"] == r["px"] and o["batch"] == r["batch"]):
        r[f"dig_speed_vs_dit_{o['impl']}"] = r["images_per_s"] / o["images_per_s"]
        if r.get("images_per_s_interleaved") and o.get("images_per_s_interleaved"):
          r[f"dig_speed_vs_dit_{o['impl']}_interleaved"] = (r["images_per_s_interleaved"] /
                                                           o["images_per_s_interleaved"])
        if r.get("peak_bytes") and o.get("peak_bytes"):
          r[f"dig_memory_vs_dit_{o['impl']}"] = r["peak_bytes"] / o["peak_bytes"]
      elif (o.get("family") == "DiT" and o.get("status") == "OOM" and o["size"] == r["size"]
            and o["px"] == r["px"] and o["batch"] == r["batch"]):
        r[f"dig_speed_vs_dit_{o['impl']}"] = "DiT OOM"


def fmt(x, spec):
  return "-" if x is None else format(x, spec)


def _impl(row: dict) -> str:
  out = row["impl"]
  if row.get("conv_backend", "auto") != "auto":
    out += f", conv {row['conv_backend']}"
  if row.get("elementwise_backend", "auto") != "auto":
    out += f", elementwise {row['elementwise_backend']}"
  layout = row.get("optimizer_layout", "per_leaf")  # rows from before the option: as _row_key
  if layout != "auto" and mode(row) == "train":
    out += f", optimizer {layout}"
  remat = row.get("remat", "none")
  return out if remat == "none" else f"{out}, remat {remat}"


def gflops_per_image(row: dict) -> float:
  """FLOPs per image of what one timed step does: a training step, or a denoising step."""
  return row.get("step_gflops_per_image" if mode(row) == "sample" else
                 "train_gflops_per_image", 0.0)


def table(rows: list[dict]) -> str:
  sampling = any(mode(r) == "sample" for r in rows)
  steps = sorted({r.get("sample_steps") for r in rows if mode(r) == "sample"})
  together = any("step_ms_interleaved" in r or "interleave_error" in r for r in rows)
  head = ("model", "attention", "px", "batch",
          f"img/s ({'/'.join(map(str, steps))} steps)" if sampling else "img/s",
          "denoising step ms" if sampling else "step ms",
          *(("same-process step ms",) if together else ()), "peak GiB", "max batch",
          "GFLOP/img/step" if sampling else "train GFLOP/img", "TFLOP/s", "MFU",
          "DiG/DiT speed (cudnn, xla)" + (" [same process]" if together else ""))
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    if r.get("status") != "ok":
      status = r.get("status", "error")
      detail = "" if status == "OOM" else f" ({r.get('error', '')[:60]})"
      lines.append(f"| {r['model']} | {_impl(r)} | {r['px']} | {r['batch']} | {status}{detail} "
                   f"| {'| ' if together else ''}| {peak_cell(r)} | "
                   f"{r.get('max_batch', '-')} | {gflops_per_image(r):.4g} | | | |")
      continue
    ratio = ""
    if r["family"] == "DiG":
      ratio = ", ".join(_ratio(r, f"dig_speed_vs_dit_{i}") for i in DIT_ATTENTION)
    mfu = r.get("mfu")
    same = ""
    if together:
      same = (f"{fmt(r.get('step_ms_interleaved'), '.1f')} | " if "interleave_error" not in r
              else f"{r['interleave_error'][:40]} | ")
    lines.append(
        f"| {r['model']} | {_impl(r)} | {r['px']} | {r['batch']} | {r['images_per_s']:.2f} | "
        f"{r['step_ms']:.1f} | {same}{peak_cell(r)} | "
        f"{r.get('max_batch', '-')} | {gflops_per_image(r):.4g} | {r['achieved_tflops']:.3g} | "
        f"{'-' if mfu is None else f'{100 * mfu:.1f}%'} | {ratio} |")
  if any(r.get("peak_cumulative") for r in rows):
    lines.append("\n* peak of the whole process so far (--in_process): at least the configuration's "
                 "own peak, more where an earlier configuration's was higher")
  return "\n".join(lines)


def peak_cell(row: dict) -> str:
  """Peak GiB, starred where it is the process's peak so far (--in_process)."""
  return fmt(row.get("peak_gib"), ".2f") + ("*" if row.get("peak_cumulative") else "")


def _ratio(row: dict, key: str) -> str:
  """One DiG/DiT ratio cell: "0.78x", "DiT OOM" or "-", then [the same-process ratio]."""
  v, same = row.get(key), row.get(key + "_interleaved")
  text = "-" if v is None else v if isinstance(v, str) else f"{v:.2f}x"
  return text if same is None else f"{text} [{same:.2f}x]"


def plot(rows: list[dict], path: str):
  """Images/s and peak memory against resolution, one line per model and attention."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax_speed, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.5))
  series = {}
  # one line per batch too where a model runs several batches at one resolution
  per_point = collections.Counter((r["model"], r["impl"], r["px"]) for r in rows)
  several = max(per_point.values(), default=0) > 1
  for r in rows:
    label = f"{r['model']} ({r['impl']})" + (f", batch {r['batch']}" if several else "")
    series.setdefault(label, []).append(r)
  for label, rs in series.items():
    rs = sorted(rs, key=lambda r: r["px"])
    ok = [r for r in rs if r.get("status") == "ok"]
    style = dict(marker="o", linestyle="-" if label.startswith("DiG") else "--")
    line, = ax_speed.plot([r["px"] for r in ok], [r["images_per_s"] for r in ok], label=label,
                          **style)
    mem = [r for r in ok if r.get("peak_gib") is not None and not r.get("peak_cumulative")]
    ax_mem.plot([r["px"] for r in mem], [r["peak_gib"] for r in mem], label=label,
                color=line.get_color(), **style)
    ooms = [r["px"] for r in rs if r.get("status") == "OOM"]
    for ax in (ax_speed, ax_mem):
      for px in ooms:
        ax.axvline(px, color=line.get_color(), alpha=0.3, linestyle=":")
  sampling = any(mode(r) == "sample" for r in rows)
  what = "sampling" if sampling else "training step"
  ax_speed.set(xlabel="resolution (px)", yscale="log", title="Throughput",
               ylabel="images / s (" + (f"sampling, {rows[0].get('sample_steps')} steps)"
                                        if sampling else "training)"))
  ax_mem.set(xlabel="resolution (px)", ylabel="peak device memory (GiB)", title="Peak memory")
  for ax in (ax_speed, ax_mem):
    ax.grid(True, alpha=0.3)
  ax_speed.legend(fontsize=8)
  device = next((r.get("device") for r in rows if r.get("device")), "")
  fig.suptitle(f"DiG vs DiT {what} on {device} (dotted: OOM)")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
