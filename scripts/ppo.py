"""PPO (trl<1.13), under `accelerate launch`:

    accelerate launch [--config_file recipes/accelerate/TOPOLOGY.yaml] scripts/ppo.py --config recipes/PRESET/ppo.yaml
"""

import sys

from align.stages.ppo import main

if __name__ == "__main__":
    sys.exit(main())
