"""Devices and numeric precision: the one place that maps precision names to dtypes and contexts.

Precision names follow Lightning (``32-true``, ``bf16-mixed``, ``16-mixed``) and accept their
short forms (``32``, ``bf16``, ``16``); ``auto`` means bf16 on a CUDA GPU that supports it, else
fp16 on a GPU, and fp32 on every other device (:func:`lightning_precision`, the one rule; the
entry points resolve every ``auto`` with it once, smooseg.settings).
"""

from contextlib import nullcontext

import torch

from smooseg.errors import SmoosegError

PRECISION_DTYPES = {"32": None, "32-true": None, "bf16": torch.bfloat16, "bf16-mixed": torch.bfloat16,
                    "16": torch.float16, "16-mixed": torch.float16}


def resolve_device(device):
    """``auto`` -> cuda when available, else cpu; anything else is passed to torch.device.

    Asking for CUDA on a machine without it is a SmoosegError that says so.
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise SmoosegError(f"device={device} is not a torch device ({err}); use auto, cpu or cuda") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise SmoosegError(f"device={device}: this machine has no CUDA GPU; use device=cpu or device=auto")
    return resolved


def lightning_precision(precision, device):
    """Lightning's long name of ``precision`` on ``device`` (the one rule for ``auto``): ``auto`` ->
    bf16-mixed on a CUDA GPU with bf16, 16-mixed on other CUDA GPUs, 32-true elsewhere; the short
    forms 32, bf16, 16 -> 32-true, bf16-mixed, 16-mixed."""
    key = str(precision)
    if key == "auto":
        if torch.device(device).type != "cuda":
            return "32-true"
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if key not in PRECISION_DTYPES:
        raise SmoosegError(f"precision={precision} is unknown; use auto, 32, bf16 or 16 "
                           "(or 32-true, bf16-mixed, 16-mixed)")
    return {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed"}.get(key, key)


def autocast_dtype(precision, device):
    """Autocast dtype for ``precision`` on ``device``: None (float32), torch.bfloat16 or torch.float16."""
    return PRECISION_DTYPES[lightning_precision(precision, device)]


def fp32_region(device):
    """Context that switches autocast off on ``device`` so the math inside runs in float32."""
    device = torch.device(device)
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return nullcontext()


def autocast(device, precision):
    """Autocast context for ``precision`` on ``device``; float32 switches a surrounding autocast off."""
    device = torch.device(device)
    dtype = autocast_dtype(precision, device)
    if dtype is None:
        return fp32_region(device)
    return torch.autocast(device_type=device.type, dtype=dtype)


def accelerator_device(accelerator):
    """The device type Lightning runs on for ``trainer.accelerator``: cuda for gpu / cuda (and auto
    where CUDA is there), cpu for cpu (and auto elsewhere), anything else as it is (mps, ...)."""
    accelerator = str(accelerator)
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu" if accelerator in ("cpu", "auto") else accelerator


def check_accelerator(accelerator, key="trainer.accelerator"):
    """Refuse a CUDA ``trainer.accelerator`` (``gpu``, ``cuda``) on a machine without CUDA, with
    one line that says so (Lightning's own error is a multi-line MisconfigurationException);
    returns ``accelerator``. Other values (``auto``, ``cpu``, ``mps``, ...) are left to Lightning."""
    if str(accelerator) in ("gpu", "cuda") and not torch.cuda.is_available():
        raise SmoosegError(f"{key}={accelerator} (trainer=gpu / trainer=ddp): this machine has no CUDA GPU; "
                           "use trainer=cpu or trainer.accelerator=auto")
    return accelerator
