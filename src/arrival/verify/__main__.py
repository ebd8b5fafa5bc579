"""``python -m arrival.verify ROLE CONFIG-JSON``: one workload process of a verify run
(``arrival.verify.workload``)."""

import sys

from arrival.verify.workload import main

main(sys.argv[1:])
