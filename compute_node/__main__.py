import sys

from strata.runtime.lifetime import die_with_parent

die_with_parent()  # before the imports below (torch, gRPC) take seconds

from compute_node.server import main  # noqa: E402

sys.exit(main())
