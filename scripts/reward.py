r"""Reward model training, under `accelerate launch`:

    accelerate launch [--config_file recipes/accelerate/TOPOLOGY.yaml] \
        scripts/reward.py --config recipes/PRESET/reward.yaml
"""

import sys

from align.stages.reward import main

if __name__ == "__main__":
    sys.exit(main())
