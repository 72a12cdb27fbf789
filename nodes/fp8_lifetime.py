"""When a quantized model's FP8 weights are made again and when they are freed, told by ComfyUI's
model callbacks.

- Made again: after ComfyUI loads or patches weights in place (LoRA at load, hooks), which the FP8
  layers cannot see by themselves.
- Kept: when ComfyUI detaches the model without unpatching it. It does so at the start of every
  sampling run of a model that is already loaded, just before seating it again, and when a clone is
  garbage-collected. The weights stay where they are, so their FP8 copies still match them; freeing
  them there made every run quantize the whole model again (80 ms of a 1.8 s Flux-dev run).
- Freed: when ComfyUI unloads the model (detach with unpatch_all); when the last model that uses
  them is deleted; and when, a moment after such a detach, no loaded model uses them (another clone
  of the checkpoint, not quantized, took the quantized one's place).
"""

from __future__ import annotations

import sys
import threading
import weakref

import comfy.model_management
from comfy.patcher_extension import CallbacksMP

from ..quant import fp8_layers
from ..quant.standin import mark_stale
from .patching import FP8_LOCK, release_unless_running, state_of

CALLBACK_KEY = "diffboost.fp8"

# Per FP8 stand-in (by id of its layers' tuple): the stand-in, weakly, and the models using it.
_USERS: dict[int, tuple[weakref.ref, weakref.WeakSet]] = {}


def _track(patcher) -> None:
    denoiser = state_of(patcher).denoiser
    layers = fp8_layers(denoiser)
    if not layers:
        return
    key = id(layers)
    with FP8_LOCK:  # a garbage collection may finalize a model on any thread
        entry = _USERS.get(key)
        if entry is None or entry[0]() is None:
            entry = (weakref.ref(denoiser), weakref.WeakSet())
        if patcher in entry[1]:
            return
        entry[1].add(patcher)
        _USERS[key] = entry  # after the add: a collection during it may have dropped an entry then empty
    weakref.finalize(patcher, _user_gone, key).atexit = False  # nothing to free for a process that ends


def _user_gone(key: int) -> None:
    with FP8_LOCK:
        entry = _USERS.get(key)
        if entry is None or any(True for _ in entry[1]):  # iterating skips the dead: len() may not yet
            return
        del _USERS[key]
    denoiser = entry[0]()
    if denoiser is not None:
        release_unless_running(denoiser)


def _weights_changed(patcher, *_) -> None:
    mark_stale(state_of(patcher).denoiser)


def _model_detached(patcher, unpatch_all) -> None:
    denoiser = state_of(patcher).denoiser
    if unpatch_all:  # the weights leave the device (or lose their patches): the copies are of no use
        release_unless_running(denoiser)
    elif fp8_layers(denoiser):
        _check_seated_later(denoiser)


# Seconds after a detach without unpatching to look whether a loaded model still uses the FP8 weights:
# ComfyUI seats the same model again right after it (a new sampling run), or another clone in its place.
SEATED_CHECK_S = 5.0


def _check_seated_later(denoiser) -> None:
    if sys.is_finalizing():  # a clone collected as the process ends: no thread starts then (3.11 hangs)
        return
    timer = threading.Timer(SEATED_CHECK_S, _release_unless_seated, args=(weakref.ref(denoiser),))
    timer.daemon = True
    timer.start()


def _release_unless_seated(denoiser_ref: weakref.ref) -> None:
    denoiser = denoiser_ref()
    if denoiser is None:
        return
    layers = fp8_layers(denoiser)
    for loaded in list(comfy.model_management.current_loaded_models):
        patcher = loaded.model
        if patcher is not None and fp8_layers(state_of(patcher).denoiser) is layers:
            return
    release_unless_running(denoiser)


def _cloned(patcher, clone) -> None:
    _track(clone)


CALLBACKS = ((CallbacksMP.ON_LOAD, _weights_changed), (CallbacksMP.ON_APPLY_HOOKS, _weights_changed),
             (CallbacksMP.ON_DETACH, _model_detached), (CallbacksMP.ON_CLONE, _cloned))


def add_fp8_callbacks(patcher) -> None:
    """Install CALLBACKS on `patcher` (its clones inherit them), replacing any an earlier Quantize FP8
    put there (not doubling them), and count it as a user of its FP8 weights."""
    for call_type, callback in CALLBACKS:
        patcher.remove_callbacks_with_key(call_type, CALLBACK_KEY)
        patcher.add_callback_with_key(call_type, CALLBACK_KEY, callback)
    _track(patcher)
