"""Entry point: python -m hypervisor."""
import sys

try:
    from .cli import main
except ImportError as e:        # a C extension older than the header, a missing package
    print(f"trapless: {e}", file=sys.stderr)
    sys.exit(2)

sys.exit(main())
