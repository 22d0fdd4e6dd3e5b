"""Videos (animated WebP) for every prompt of a file, baseline and method side by side (see demos/scripts.py)."""
import sys

from mmattn.demos.scripts import generate_main

if __name__ == "__main__":
    sys.exit(generate_main(video=True))
