import sys

from azure_iot_emulator.cli import main

sys.exit(main())
