"""`python -m kv_store --listen ... --session ...`: run the KV store service."""

import sys

from strata.runtime.lifetime import die_with_parent

die_with_parent()  # before the imports below (torch, gRPC) take seconds

from kv_store.server import main  # noqa: E402

sys.exit(main())
