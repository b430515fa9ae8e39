import sys

from gspo_cli import main

sys.exit(main())
