"""`python -m fedjax_lm.bench ...` until `fedjax-lm bench` is wired in."""

import sys

from fedjax_lm.bench.run import main

sys.exit(main())
