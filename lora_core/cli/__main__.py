"""``python -m lora_core.cli ...``: the same as the ``lora-core`` script."""

import sys

from lora_core.cli import main

sys.exit(main())
