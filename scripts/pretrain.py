r"""Pretrain the from-scratch GPT, under `accelerate launch`:

    accelerate launch [--config_file recipes/accelerate/X.yaml] scripts/pretrain.py \
        --config recipes/<preset>/pretrain.yaml [--key value ...]
"""

import sys

from align.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
