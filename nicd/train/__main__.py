"""`python -m nicd.train` — the same as `nicd train`, without typer (used by background runs)."""

from ..cli import app

if __name__ == "__main__":
    app(["train", *__import__("sys").argv[1:]], prog_name="nicd")
