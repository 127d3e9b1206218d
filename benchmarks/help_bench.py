"""How long each program's ``--help`` takes, start-up included (the target: under 2 s each).

    python -m benchmarks.help_bench [--repeats 3] [--json PATH]

Each top-level script runs ``--help`` in a fresh interpreter ``--repeats`` times; the fastest run
is reported (background load only ever adds time).
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("train_segmentation.py", "eval_segmentation.py", "segment_images.py", "download_datasets.py",
           "crop_datasets.py")
TARGET_S = 2.0


def time_help(script, repeats):
    """The fastest of ``repeats`` wall-clock times of ``python <script> --help``, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / script), "--help"], cwd=ROOT, check=True,
                       capture_output=True)
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.help_bench",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    results = {script: time_help(script, args.repeats) for script in SCRIPTS}
    for script, seconds in results.items():
        verdict = "ok" if seconds < TARGET_S else "OVER"
        print(f"{script:<24} --help {seconds:5.2f} s  {verdict} (< {TARGET_S:g} s)")
    if args.json is not None:
        args.json.write_text(json.dumps({"help_seconds": results, "target_s": TARGET_S}, indent=2))
    return results


if __name__ == "__main__":
    main()
