"""Compiled regions that inductor's CUDA graphs left out. With `cudagraphs` on, inductor runs a region it
cannot capture (one that writes into its inputs, one on the CPU, ...) kernel by kernel and says so only
in its log ("skipping cudagraphs due to ..."): such a step is then only as fast as the host launching it."""

from __future__ import annotations

import logging
import threading

from torch._dynamo.utils import counters

# Where torch logs those lines (torch._inductor.cudagraph_utils, log artifact "cudagraphs").
_TORCH_LOGGER = "torch._inductor.cudagraph_utils.__cudagraphs"
_PREFIX = "skipping cudagraphs due to "


class SkippedRegions(logging.Handler):
    """While open: the reasons inductor logged for each region its CUDA graphs skipped in this thread,
    and how many it skipped (its counter: on the CPU it skips without a log line)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.reasons: list[str] = []
        self.count = 0
        self._thread = threading.get_ident()
        self._before = 0

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.thread == self._thread and message.startswith(_PREFIX):
            # "mutated inputs (2 instances). Found from : <stack>": the reason, without the stack.
            self.reasons.append(message[len(_PREFIX):].split(". Found from")[0].splitlines()[0].strip())

    def __enter__(self) -> SkippedRegions:
        self._before = counters["inductor"]["cudagraph_skips"]
        logging.getLogger(_TORCH_LOGGER).addHandler(self)
        return self

    def __exit__(self, *exc) -> bool:
        logging.getLogger(_TORCH_LOGGER).removeHandler(self)
        self.count = max(counters["inductor"]["cudagraph_skips"] - self._before, len(self.reasons))
        return False
