"""The precision table: accuracy, decode latency and size per budget and precision (cspkv.bench.precision_table).

    python scripts/precision_table.py --help
"""

import sys

from cspkv.bench.precision_table import main

if __name__ == "__main__":
    sys.exit(main())
