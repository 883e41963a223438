"""Average ranks of runs over several measures (rank 1 = best; ties share the mean rank), shared
by the normaliser tables (benches/vision_norms_table.py, benches/recovery_norms_table.py)."""


def ranks(values, higher):
    order = sorted(values, key=lambda v: -v if higher else v)
    return [sum(i + 1 for i, o in enumerate(order) if o == v) / order.count(v) for v in values]


def average_ranks(runs, measures):
    """runs: {name: run}; measures: [(label, value of a run, higher is better)]."""
    names = list(runs)
    avg = {n: 0.0 for n in names}
    for _, f, higher in measures:
        for n, r in zip(names, ranks([f(runs[n]) for n in names], higher)):
            avg[n] += r / len(measures)
    return avg
