"""`python -m nicd.train`: the same as `nicd train`, for a checkout on PYTHONPATH with no `nicd` entry point installed (scripts/gpu-train runs it so on a lent GPU)."""

from ..cli import app

if __name__ == "__main__":
    app(["train", *__import__("sys").argv[1:]], prog_name="nicd")
