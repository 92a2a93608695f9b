"""`python -m fastformer` is the same program as the `fastformer` console script."""
import sys

from .cli import main

sys.exit(main())
