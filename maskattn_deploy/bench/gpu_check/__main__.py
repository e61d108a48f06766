"""``python -m maskattn_deploy.bench.gpu_check CONFIG_JSON``: the dry run's interpreter child."""

import sys

from maskattn_deploy.bench.gpu_check.run import child_main

if __name__ == "__main__":
    raise SystemExit(child_main(sys.argv[1:]))
