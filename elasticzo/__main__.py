"""``python -m elasticzo`` (and ``torchrun ... -m elasticzo train ...``) runs the CLI."""
import sys

from elasticzo.cli import main

sys.exit(main())
