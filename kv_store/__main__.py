"""`python -m kv_store --listen ... --session ...`: run the KV store service."""

import sys

from kv_store.server import main

sys.exit(main())
