"""`hybridinfer tune` (in progress)."""


def register(sub, add, plan_args) -> None:
    pass
