"""`python -m services.scheduler [flags]`: same as `kvferry scheduler`, without the CLI's other imports."""

import sys

from services.scheduler.process import main

sys.exit(main())
