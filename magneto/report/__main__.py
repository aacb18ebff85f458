import sys

from magneto.report.cli import main

sys.exit(main())
