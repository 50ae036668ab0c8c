"""Where the ranks run, written for people: rank ranges and hosts."""

from __future__ import annotations


def rank_ranges(ranks: list) -> str:
    """Sorted ranks written compactly: [0, 1, 2, 5] -> '0-2,5'."""
    ranks, parts = sorted(ranks), []
    start = previous = ranks[0]
    for rank in [*ranks[1:], None]:
        if rank is not None and rank == previous + 1:
            previous = rank
            continue
        parts.append(f"{start}-{previous}" if previous > start else f"{start}")
        if rank is not None:
            start = previous = rank
    return ",".join(parts)


def host_placement(hostnames: list) -> str:
    """Where the ranks run, from every rank's hostname in rank order:
    'hosts: node1 ranks 0-1, node2 ranks 2-3' (hosts in the order of their first rank)."""
    ranks_of: dict = {}
    for rank, host in enumerate(hostnames):
        ranks_of.setdefault(host, []).append(rank)
    return "hosts: " + ", ".join(f"{host} rank{'s' if len(ranks) > 1 else ''} {rank_ranges(ranks)}"
                                 for host, ranks in ranks_of.items())
