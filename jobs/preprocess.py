"""`ray job submit` entry point for the preprocessing stage: the `vggdist-preprocess` CLI.

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/preprocess.py shard --source /data/ILSVRC2012_img_train.tar --split train --out /data/shards

Inside a Ray job RAY_ADDRESS is set, so the shard tasks run on the cluster (every node must see --source and --out).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the job's working dir holds `preprocess/`

from preprocess.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
