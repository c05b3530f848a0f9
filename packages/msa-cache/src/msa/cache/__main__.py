import sys

from msa.cache.cli import main

sys.exit(main())
