import sys

from dcod.cli import main

sys.exit(main())
