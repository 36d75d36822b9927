import sys

from timm_ic.cli import main

sys.exit(main())
