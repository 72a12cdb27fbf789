"""one-pass-norms: a normalisation over a row of up to 4096 channels (the DiTs' layer norms with the
residual adds and modulation fused around them) is compiled as one pass that holds the row on chip,
instead of inductor's two passes over memory for rows wider than 1024 (first the mean and variance,
then the normalised output, reading the row again).

Done through inductor's own extension point for its heuristics (`InductorChoices`), named in the
compile's settings (so in its cache key) and installed by the inductor backend only while Compile
Model's own graphs are compiled, so other compiles in the process are not changed.
Imported only when a mode asks for it: it loads inductor's modules.
"""

from __future__ import annotations

from torch._inductor import config
from torch._inductor.choices import InductorChoices
from torch._inductor.runtime.hints import ReductionHint
from torch._inductor.virtualized import V

WIDEST_ROW = 4096  # Flux's 3072 channels fit; inductor's own limit for one pass is 1024


class OnePassNorms(InductorChoices):
    """Inductor's heuristics, except that row-wise reductions up to WIDEST_ROW wide take one pass."""

    def should_use_persistent_reduction(self, features, cooperative_reduction, *args, **kwargs) -> bool:
        if super().should_use_persistent_reduction(features, cooperative_reduction, *args, **kwargs):
            return True
        if not config.triton.persistent_reductions or cooperative_reduction:
            return False
        if features.get_reduction_hint() != ReductionHint.INNER:
            return False  # only rows contiguous in memory: a norm over the channels
        if getattr(features, "strict_sum_rblock", lambda: None)() is not None:
            return False  # a sum whose block size is fixed for reproducibility stays as inductor has it
        return V.graph.sizevars.statically_known_leq(features.reduction_numel, WIDEST_ROW)

    @staticmethod
    def uuid() -> str:
        # Inductor's cache key: a graph compiled with these heuristics is not reused without them.
        return f"diffboost-one-pass-norms-{WIDEST_ROW}"


def settings() -> dict:
    """The inductor config entry naming these heuristics. A torch without that entry drops it (see
    `inductor_settings`) and the flag changes nothing there: heuristics outside the cache key could be
    served to other compiles."""
    return {"inductor_choices_class": OnePassNorms}
