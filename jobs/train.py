"""Entry point for `ray job submit --working-dir . -- python jobs/train.py ...`: the same flags as `vggdist train`.

Inside a Ray job RAY_ADDRESS points at the cluster, so `vggdist train` connects to it instead of starting a local Ray.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir, when vggdist is not installed

from vggdist.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
