import sys

from strata.runtime.lifetime import die_with_parent

die_with_parent()

from gateway.server import main  # noqa: E402

sys.exit(main())
