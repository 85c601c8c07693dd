"""Supervised fine-tuning, under `accelerate launch`:

    accelerate launch [--config_file recipes/accelerate/TOPOLOGY.yaml] scripts/sft.py --config recipes/PRESET/sft.yaml
"""

import sys

from align.stages.sft import main

if __name__ == "__main__":
    sys.exit(main())
