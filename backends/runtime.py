"""Process-wide torch switches a mode needs while the compiled model runs, set for the call only
and restored afterwards, so that nothing else in the process sees them."""

from __future__ import annotations

import contextlib

import torch

from .modes import CompileMode

RECOMPILE_LIMIT = 64


@contextlib.contextmanager
def runtime_switches(mode: CompileMode):
    saved = []

    def switch(obj, attr, value):
        saved.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, value)

    try:
        if mode.benchmark:
            switch(torch.backends.cudnn, "benchmark", True)
        if mode.low_precision:
            matmul = torch.backends.cuda.matmul
            switch(matmul, "allow_fp16_reduced_precision_reduction", True)
            switch(matmul, "allow_bf16_reduced_precision_reduction", True)
            switch(matmul, "allow_tf32", True)
            switch(torch.backends.cudnn, "allow_tf32", True)
        dynamo = torch._dynamo.config
        limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
        if getattr(dynamo, limit) < RECOMPILE_LIMIT:
            # Older torch has no per-compile limit; blocks of many shapes would hit the default of 8.
            switch(dynamo, limit, RECOMPILE_LIMIT)
        yield
    finally:
        for obj, attr, value in reversed(saved):
            setattr(obj, attr, value)
