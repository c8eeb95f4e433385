"""`python visualize.py --model_path checkpoint.pth`: watch, record or score a trained agent
(the same as `titan-rl visualize`; the code is titan_rl/visualize.py)."""

import sys

from titan_rl.visualize import main

if __name__ == "__main__":
    sys.exit(main(prog="python visualize.py"))
