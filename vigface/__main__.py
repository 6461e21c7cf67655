import sys

from vigface.cli.main import main

sys.exit(main())
