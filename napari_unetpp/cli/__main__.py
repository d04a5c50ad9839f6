"""``python -m napari_unetpp.cli``: the command line."""

import sys

from napari_unetpp.cli.app import main

if __name__ == "__main__":
    sys.exit(main())
