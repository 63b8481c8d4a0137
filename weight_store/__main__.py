"""`python -m weight_store --model DIR --listen ADDR --session S`."""

import sys

from weight_store.server import main

sys.exit(main())
