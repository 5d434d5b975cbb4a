"""An example task that fails: it reports some progress, then raises (exit code 1, traceback on stderr)."""

import sys
import time


def main() -> int:
    print("loading the data set")
    for percent in (10, 20, 30):
        print(f"##progress {percent}")
        print(f"##metric loss={1.0 - percent / 100:.2f}", flush=True)
        time.sleep(0.05)
    print("about to read a shard that is not there", file=sys.stderr)
    raise RuntimeError("shard 3 of the training data is corrupt (this example fails on purpose)")


if __name__ == "__main__":
    sys.exit(main())
