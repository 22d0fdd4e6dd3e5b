"""VQA accuracy and timing of a VLM with a method over rows or shapes-world questions (see demos/scripts.py)."""
import sys

from mmattn.demos.scripts import vqa_main

if __name__ == "__main__":
    sys.exit(vqa_main())
