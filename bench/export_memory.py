"""Peak memory of exporting a ZeRO checkpoint to safetensors: bigscale's streaming
``export_checkpoint`` against DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` (the
whole fp32 state dict in memory) followed by safetensors ``save_file``. Each export runs in a
fresh subprocess, the two alternating, several rounds, median.

    .venv/bin/python bench/export_memory.py [--hidden 768 --layers 8 --ranks 1 --rounds 3]

The checkpoints are real ones: ``bigscale train`` runs one step of a 61.5M-parameter
Llama-shaped model (fp32 on CPU) with ZeRO-2 and with ZeRO-3 and saves at the end.

Memory is read by this (parent) process from /proc/<child>/status every few milliseconds, so
nothing in the exporting process changes to measure it:
- RssAnon: the process's own heap (tensors, bytes buffers); what an export really needs.
- RssFile: pages of memory-mapped files the process has touched. bigscale maps the checkpoint's
  shard files and touches every weight once; DeepSpeed maps the optimizer files too. These pages
  are the OS page cache: clean, shared, dropped under memory pressure, never swapped.
- VmHWM: the kernel's exact peak of RssAnon + RssFile + RssShmem over the process's life.
Each child imports the same modules (torch, transformers with the model's config and tokenizer
classes, DeepSpeed, safetensors, bigscale's exporter) before the export starts, so the import
footprint is the same on both sides; the "export's own" figures subtract what the process held
once those imports were done."""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from runs import REPO, bigscale_train, child_env, model_dir, train_overrides

POLL_S = 0.005
TIMEOUT_S = 600.0
MB = 1e6
FIELDS = ("VmRSS", "RssAnon", "RssFile")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--ranks", type=int, default=1, help="ranks that write the checkpoint")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-shard-size", default="50MB", help="bigscale's output shards")
    # The exports themselves re-enter this file; these are theirs.
    parser.add_argument("--child", choices=["bigscale", "deepspeed"])
    parser.add_argument("--checkpoints", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--marks", type=Path)
    args = parser.parse_args()
    if args.child:
        export_child(args.child, args.checkpoints, args.out, args.marks, args.max_shard_size)
        return

    work = Path(tempfile.mkdtemp(prefix="bench-export-"))
    try:
        checkpoint_roots: dict[str, Path] = {}
        for strategy in ("zero2", "zero3"):
            run_dir = work / strategy
            overrides = train_overrides(
                work, run_dir, args.hidden, args.layers, strategy, 8, args.ranks
            )
            seconds = bigscale_train(
                work, [*overrides, "trainer.max_steps=1"], work / f"{strategy}.out"
            )
            print(f"{strategy} checkpoint written by {args.ranks} rank(s) in {seconds:.0f}s")
            checkpoint_roots[strategy] = run_dir / "checkpoints"

        results: dict[tuple[str, str], list[dict[str, float]]] = {}
        for r in range(args.rounds):
            for strategy, checkpoints in checkpoint_roots.items():
                sides = ["bigscale", "deepspeed"]
                # Alternate who goes first, so page-cache and allocator state favour neither.
                for side in sides if r % 2 == 0 else sides[::-1]:
                    out = work / f"export-{strategy}-{side}"
                    shutil.rmtree(out, ignore_errors=True)
                    m = measure(side, checkpoints, out, work, args.max_shard_size)
                    m["weight_bytes"] = safetensors_bytes(out)
                    results.setdefault((strategy, side), []).append(m)
            print(f"round {r + 1} done", flush=True)

        fp32_mb = safetensors_bytes(model_dir(work, args.hidden, args.layers)) / MB
        report(args, fp32_mb, results)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(side: str, checkpoints: Path, out: Path, work: Path, shard: str) -> dict[str, float]:
    marks = work / "marks.jsonl"
    marks.unlink(missing_ok=True)
    command = [sys.executable, __file__, "--child", side, "--checkpoints", str(checkpoints)]
    command += ["--out", str(out), "--marks", str(marks), "--max-shard-size", shard]
    samples: list[tuple[float, dict[str, int]]] = []
    log = work / "export.out"
    with log.open("w") as output:
        proc = subprocess.Popen(
            command, cwd=REPO, env=child_env(work), stdout=output, stderr=output
        )
        status = Path(f"/proc/{proc.pid}/status")
        deadline = time.time() + TIMEOUT_S
        while proc.poll() is None and time.time() < deadline:
            sample = read_status(status)
            if sample:
                samples.append((time.time(), sample))
            time.sleep(POLL_S)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        sys.exit(f"{side} export failed (exit {proc.returncode}):\n{log.read_text()[-4000:]}")
    m = json.loads(marks.read_text())
    during = [s for t, s in samples if m["start"] <= t <= m["end"]]
    if not during:  # an export faster than one poll: the child's own readings still hold
        during = [m["at_start"]]
    peak = {f: max(s[f] for s in during) for f in FIELDS}
    return {
        "seconds": m["end"] - m["start"],
        "hwm": m["vmhwm"],
        "rss_at_start": m["at_start"]["VmRSS"],
        "anon_at_start": m["at_start"]["RssAnon"],
        "file_at_start": m["at_start"]["RssFile"],
        **{f"peak_{f}": v for f, v in peak.items()},
        "anon_own": peak["RssAnon"] - m["at_start"]["RssAnon"],
        "rss_own": peak["VmRSS"] - m["at_start"]["VmRSS"],
    }


def read_status(path: Path) -> dict[str, int] | None:
    """VmRSS, RssAnon and RssFile in bytes (the file says kB), or None once the process is
    gone."""
    try:
        text = path.read_text()
    except OSError:
        return None
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in (*FIELDS, "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values if all(f in values for f in FIELDS) else None


def safetensors_bytes(out: Path) -> int:
    """Tensor bytes in the .safetensors files of ``out``, from their headers: both sides must
    have written the same weights."""
    total = 0
    for path in out.glob("*.safetensors"):
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        total += sum(
            v["data_offsets"][1] - v["data_offsets"][0]
            for k, v in header.items()
            if k != "__metadata__"
        )
    return total


def report(
    args: argparse.Namespace, fp32_mb: float, results: dict[tuple[str, str], list[dict]]
) -> None:
    print(
        f"\nmodel: Llama-shaped, hidden {args.hidden}, {args.layers} layers, fp32 weights "
        f"{fp32_mb:.0f} MB; checkpoints written by {args.ranks} rank(s); medians of "
        f"{args.rounds} rounds; MB = 10^6 bytes"
    )
    print(
        "  bigscale:  export_checkpoint(run/checkpoints, out, "
        f"max_shard_size={args.max_shard_size!r})"
    )
    print(
        "  deepspeed: get_fp32_state_dict_from_zero_checkpoint(run/checkpoints) + "
        "safetensors save_file"
    )
    for strategy in ("zero2", "zero3"):
        ours = {k: statistics.median(d[k] for d in results[(strategy, "bigscale")]) for k in KEYS}
        base = {k: statistics.median(d[k] for d in results[(strategy, "deepspeed")]) for k in KEYS}
        print(f"\n{strategy:44s}bigscale   deepspeed   ratio")
        for key, label in KEYS.items():
            if key == "seconds":
                a, b, fmt = ours[key], base[key], "{:7.2f} s "
            else:
                a, b, fmt = ours[key] / MB, base[key] / MB, "{:7.0f} MB"
            ratio = f"{a / b:5.2f}x" if b else ""
            print(f"  {label:42s} {fmt.format(a)} {fmt.format(b)}  {ratio}")


KEYS = {
    "hwm": "peak RSS, whole process (VmHWM)",
    "rss_at_start": "RSS after imports",
    "peak_RssAnon": "peak anonymous memory (RssAnon)",
    "anon_at_start": "  RssAnon after imports",
    "anon_own": "  the export's own (peak - after imports)",
    "peak_RssFile": "peak mapped-file pages (RssFile)",
    "file_at_start": "  RssFile after imports (libraries)",
    "peak_VmRSS": "peak RSS during the export",
    "weight_bytes": "tensor bytes written",
    "seconds": "export time",
}


# -- the exporting processes ------------------------------------------------------------------


def export_child(side: str, checkpoints: Path, out: Path, marks: Path, shard: str) -> None:
    from bigscale.quiet import quiet_third_party

    quiet_third_party()
    # Both sides import everything either needs before the clock and the "at start" reading,
    # the model's config and tokenizer classes included (transformers imports those lazily,
    # 1-2 s and tens of MB on first use), so only the export itself differs.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import save_file
    from transformers import LlamaConfig, PreTrainedTokenizerFast  # noqa: F401

    from bigscale.checkpoint.export import export_checkpoint
    from bigscale.dist import ds_files  # noqa: F401  (the exporter imports it on first use)

    start, at_start = time.time(), read_status(Path("/proc/self/status"))
    if side == "bigscale":
        export_checkpoint(checkpoints, out, max_shard_size=shard)
    else:
        # DeepSpeed's documented one-call conversion, then one safetensors file.
        state_dict = get_fp32_state_dict_from_zero_checkpoint(str(checkpoints))
        out.mkdir(parents=True)
        save_file(state_dict, out / "model.safetensors", metadata={"format": "pt"})
    end = time.time()
    vmhwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB
    marks.write_text(json.dumps({"start": start, "end": end, "at_start": at_start, "vmhwm": vmhwm}))


if __name__ == "__main__":
    main()
