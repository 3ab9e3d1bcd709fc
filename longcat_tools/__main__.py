import sys

from longcat_tools.cli import main

sys.exit(main())
