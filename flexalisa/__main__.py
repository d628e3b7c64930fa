import sys

from flexalisa.cli import main

sys.exit(main())
