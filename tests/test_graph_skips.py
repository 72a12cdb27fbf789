"""Regions that inductor's CUDA graphs leave out are counted and named on the compiled model (they run
kernel by kernel, so a step is only as fast as the host launching it)."""

from __future__ import annotations

import threading

import torch
from torch._inductor.cudagraph_utils import log_cudagraph_skip_and_bump_counter

from diffboost.backends import CompileOptions, compile_module, parse_mode
from diffboost.backends.graph_skips import SkippedRegions

# The line inductor logs for a Flux block that adds to its input in place (stack shortened).
MUTATION = ("skipping cudagraphs due to mutated inputs (2 instances). Found from : \n"
            '   File "comfy/ldm/flux/layers.py", line 262, in forward\n    img += ...')


def test_skipped_regions_are_counted_with_the_reason_torch_logs():
    with SkippedRegions() as skipped:
        log_cudagraph_skip_and_bump_counter(MUTATION)
        other = threading.Thread(target=log_cudagraph_skip_and_bump_counter,
                                 args=("skipping cudagraphs due to cpu device (x)",))
        other.start()
        other.join()
    assert skipped.reasons == ["mutated inputs (2 instances)"]  # not the other thread's
    assert skipped.count == 2  # torch's counter is process-wide: both count
    with SkippedRegions() as none:
        pass
    assert none.count == 0 and none.reasons == []


def test_a_compile_with_cuda_graphs_off_a_gpu_says_so():
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.GELU()).eval()
    x = torch.randn(2, 16)
    with torch.no_grad():
        with_graphs = compile_module(net, CompileOptions(mode=parse_mode("O2")))
        with_graphs(x)
        with_graphs(x)
        without = compile_module(net, CompileOptions(mode=parse_mode("default")))
        without(x)
    assert with_graphs.stats.cuda_graph_skips == ["the model is not on a CUDA GPU"]  # once, at the compile
    assert any("CUDA graphs left out 1 compiled region" in e for e in with_graphs.stats.events)
    assert without.stats.cuda_graph_skips == []
