"""CI's latency regression gate: export a small fixed model, then time its full decode step against
the bare decode graph in the same process, for the runtime and for the planted full-cache copy.
Exit 1 unless the runtime passes the limit and the planted copy fails it (cspkv.bench.regression).

    python scripts/latency_regression.py                 # the gate, both variants
    python scripts/latency_regression.py --runtime-only  # just the runtime's figure
"""

import argparse
import os
import sys
import tempfile

# One thread for the runtime: a busy neighbour then slows the step and the bare graph alike
# instead of stealing a second core from one of them.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runtime-only", action="store_true", help="skip the planted full-cache copy")
    parser.add_argument("--export-dir", default=None, help="reuse an export of the small model")
    args = parser.parse_args()

    from cspkv.bench import regression
    from cspkv.runtime.manifest import ManifestError, read_manifest

    folder = args.export_dir or tempfile.mkdtemp(prefix="cspkv-latency-")
    try:
        read_manifest(folder)          # reuse a current export of the small model
    except ManifestError:              # none yet, or one from an older cspkv
        regression.export_small(folder)
    runtime = regression.measure(folder)
    planted = None if args.runtime_only else regression.measure(folder, copy_cache_each_step=True)
    ok, lines = regression.gate(runtime, planted)
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
