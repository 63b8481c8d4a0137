"""`strata bench` (filled in by the benchmark module)."""


def add_bench_parser(sub) -> None:
    return None
