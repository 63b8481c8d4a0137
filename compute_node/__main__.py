import sys

from compute_node.server import main

sys.exit(main())
