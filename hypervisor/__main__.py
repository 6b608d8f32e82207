"""Entry point: python -m hypervisor."""
import sys

from .cli import main

sys.exit(main())
