"""`python -m preprocess …` is `vggdist-preprocess …`."""

import sys

from preprocess.cli import main

sys.exit(main())
