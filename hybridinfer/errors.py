"""One error type for everything a user can cause: the CLI prints it as a single line and exits 2."""


class HybridError(Exception):
    """A problem the user can fix. `str()` is one line: what is wrong, then how to fix it."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} — {fix}" if fix else problem)
