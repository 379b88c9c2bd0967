"""`python -m autocdsr ...` (also what `torchrun -m autocdsr` runs)."""
import sys

from .cli import main

sys.exit(main())
