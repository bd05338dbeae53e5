import sys

from bt_plugin.tools.cli import main

sys.exit(main())
