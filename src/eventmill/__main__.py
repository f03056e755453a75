import sys

from eventmill.cli import main

sys.exit(main())
