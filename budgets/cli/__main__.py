import sys

from budgets.cli import main

sys.exit(main())
