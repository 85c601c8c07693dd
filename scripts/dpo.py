"""DPO, under `accelerate launch`:

    accelerate launch [--config_file recipes/accelerate/TOPOLOGY.yaml] scripts/dpo.py --config recipes/PRESET/dpo.yaml
"""

import sys

from align.stages.dpo import main

if __name__ == "__main__":
    sys.exit(main())
