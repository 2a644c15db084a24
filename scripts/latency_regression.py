"""CI's latency regression check: export a small fixed model, time its decode step against a
reference workload, compare with the committed baseline ratio.

    python scripts/latency_regression.py                # check (exit 1 on regression)
    python scripts/latency_regression.py --plant-copy   # the full-buffer-copy variant: should fail
    python scripts/latency_regression.py --write-baseline
"""

import argparse
import json
import os
import sys
import tempfile

# One thread for both the runtime and the reference workload: a busy neighbour then slows both
# alike instead of stealing a second core from one of them.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plant-copy", action="store_true", help="copy the whole cache every step (planted slowdown)")
    parser.add_argument("--write-baseline", action="store_true")
    parser.add_argument("--export-dir", default=None, help="reuse an export of the small model")
    args = parser.parse_args()

    from cspkv.bench import regression

    folder = args.export_dir or tempfile.mkdtemp(prefix="cspkv-latency-")
    from cspkv.export.manifest import ManifestError, read_manifest

    try:
        read_manifest(folder)          # reuse a current export of the small model
    except ManifestError:              # none yet, or one from an older cspkv
        regression.export_small(folder)
    measured = regression.measure(folder, copy_cache_each_step=args.plant_copy)
    if args.write_baseline:
        regression.BASELINE.write_text(json.dumps(measured, indent=2) + "\n")
        print(f"wrote {regression.BASELINE}: ratio {measured['ratio']:.3f}")
        return 0
    ok, line = regression.check(measured)
    print(line)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
