import sys

from bt_plugin.cli import main

sys.exit(main())
