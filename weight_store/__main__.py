"""`python -m weight_store --model DIR --listen ADDR --session S`."""

import sys

from strata.runtime.lifetime import die_with_parent

die_with_parent()  # before the imports below (torch, gRPC) take seconds

from weight_store.server import main  # noqa: E402

sys.exit(main())
