import sys

from loradem.cli import main

sys.exit(main())
