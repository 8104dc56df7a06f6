import sys

from dcod.cli.main import main

sys.exit(main())
