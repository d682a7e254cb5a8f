"""`python -m fedjax_lm.bench ...`: `fedjax-lm bench` without the CLI (its mesh / pmap child
processes run this)."""

import sys

from fedjax_lm.bench.run import main

sys.exit(main())
