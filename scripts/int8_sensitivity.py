"""Which module group's INT8 error changes the default model's answers (cspkv.quantize.sensitivity).

    python scripts/int8_sensitivity.py --help
"""

import sys

from cspkv.quantize.sensitivity import main

if __name__ == "__main__":
    sys.exit(main())
