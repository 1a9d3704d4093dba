"""`python -m timm_layerattn.train ...`: what torchrun launches on every rank."""
import sys

from .loop import main

if __name__ == '__main__':
    sys.exit(main())
