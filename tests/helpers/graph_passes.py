"""Graph passes on real torch.compile traces, without inductor: what a pass did to each captured graph."""

from __future__ import annotations

import torch


def compiled_counting(fn, graph_pass, fullgraph: bool = False):
    """`fn` compiled with `graph_pass(gm)` applied to each graph dynamo captures (the graph then runs as
    rewritten, uncompiled), and the list of what the pass returned for each graph."""
    counts = []

    def backend(gm, inputs):
        counts.append(graph_pass(gm))
        return gm.forward

    return torch.compile(fn, backend=backend, fullgraph=fullgraph), counts
