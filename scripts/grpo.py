"""GRPO with a verifiable reward, under `accelerate launch`:

    accelerate launch [--config_file recipes/accelerate/TOPOLOGY.yaml] scripts/grpo.py --config recipes/PRESET/grpo.yaml
"""

import sys

from align.stages.grpo import main

if __name__ == "__main__":
    sys.exit(main())
